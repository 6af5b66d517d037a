"""The WAN: link emulators, site-to-site rings, merge plans."""
