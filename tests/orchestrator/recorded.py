"""An engine's event log for tests: what was emitted, in order, without a file."""


class Events:
    def __init__(self):
        self.seen = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))

    def of(self, kind):
        """The fields of every ``kind`` event, in order."""
        return [f for e, f in self.seen if e == kind]

    def kinds(self):
        return [e for e, _ in self.seen]
