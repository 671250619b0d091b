"""``store.mask_url``: nothing between ``://`` and the last ``@`` is ever shown."""

import pytest

from store import mask_url

SECRET = "s3cr3t"


@pytest.mark.parametrize(("url", "shown"), [
    ("http://admin:s3cr3t@db:5984/acts", "http://***@db:5984/acts"),
    # A password holding '@', ':' or '/' (as people type them, not percent-encoded).
    ("http://admin:s3cr3t@x@db:5984/acts", "http://***@db:5984/acts"),
    ("http://admin:s3:cr3t@db:5984/acts", "http://***@db:5984/acts"),
    ("http://admin:s3/cr3t@db:5984/acts", "http://***@db:5984/acts"),
    ("https://admin:a/b@c:d@db.example:6984/x", "https://***@db.example:6984/x"),
    ("http://admin:s3%40cr3t@db/acts", "http://***@db/acts"),
    # A token as the user name.
    ("https://s3cr3t@db.example/acts", "https://***@db.example/acts"),
    # A path with an '@' in it, with and without credentials: masking more is fine.
    ("http://admin:s3cr3t@db:5984/acts@2024", "http://***@2024"),
    ("http://db:5984/acts@2024", "http://***@2024"),
    # No scheme.
    ("admin:s3cr3t@db:5984/acts", "***@db:5984/acts"),
    ("admin:s3cr3t@", "***@"),
    # Nothing to mask.
    ("http://db:5984/acts", "http://db:5984/acts"),
    ("sqlite:///var/lib/x.db", "sqlite:///var/lib/x.db"),
    ("", ""),
])
def test_everything_before_the_last_at_is_masked(url, shown):
    assert mask_url(url) == shown


@pytest.mark.parametrize("url", [
    "http://u:s3cr3t@h/d", "u:s3cr3t@h", "http://u:@s3cr3t@h", "http://u:s3cr3t@@h",
    "://u:s3cr3t@h", "http:/u:s3cr3t@h", "HTTP://U:s3cr3t@H/D", "http://u:s3cr3t@",
    "http://u:s3cr3t@h/p?q=@x#@y", "s3cr3t@", "@s3cr3t@h",
])
def test_the_password_never_shows(url):
    assert SECRET not in mask_url(url)
