"""The public API does not drift by accident (httpx's tests/test_exported_members.py)."""

import geotrain


def test_all_exports_exist_and_nothing_else_is_public():
    exported = set(geotrain.__all__)
    assert all(hasattr(geotrain, name) for name in exported)
    public = {n for n in dir(geotrain) if not n.startswith("_") and not isinstance(getattr(geotrain, n), type(geotrain))}
    assert public <= exported, f"public but not in __all__: {sorted(public - exported)}"


def test_every_error_derives_from_geotrain_error():
    for name in geotrain.__all__:
        obj = getattr(geotrain, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, geotrain.GeotrainError)
