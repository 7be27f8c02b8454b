"""The settings of the suite's live nodes (tests/live.py): MiniCloud's own settings module, with the fast hasher that
the in-process tests use too (conftest.py). PBKDF2's 1,000,000 rounds cost 1.5-3.5 s of a core per password on the
2-core CI machines, and the live nodes hash hundreds of seconds' worth of them (each start's admin, each login, a
class of ten imported and logged in); what a live test checks is the portal around the hash, which stays Django's."""
from minicloud.settings import *  # noqa: F401,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
