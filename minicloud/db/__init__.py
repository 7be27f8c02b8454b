"""The SQLite database backend of MiniCloud (``ENGINE = "minicloud.db"``): Django's own, with writers that queue."""
