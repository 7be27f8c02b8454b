"""``manage.py data_cache [list | clear [NAME ...] [--all] | evict [--gb N]]``: the datasets' token caches.

Jobs tokenise a dataset once into a cache under ``MINICLOUD_HOME/cache/data`` (training/token_cache.py); the engine
keeps their total under ``MINICLOUD_DATA_CACHE_GB`` by removing the least recently used. This lists them (which
dataset, processing, size, last use, and what killed builds left), clears chosen ones or all, or applies the cap
now (removing those leftovers first). A cache that a job is building is never removed; one a running job reads
stays readable to it (it keeps its mapped files).
"""
from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from training import token_cache


class Command(BaseCommand):
    help = "List, clear or evict the datasets' token caches (MINICLOUD_HOME/cache/data)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action")
        sub.add_parser("list", help="every cache, most recently used first")
        clear = sub.add_parser("clear", help="remove the named caches (or --all)")
        clear.add_argument("names", nargs="*")
        clear.add_argument("--all", action="store_true")
        evict = sub.add_parser("evict", help="remove the least recently used caches beyond the cap")
        evict.add_argument("--gb", type=float, default=None, help="the cap (default MINICLOUD_DATA_CACHE_GB)")

    def handle(self, *args, action=None, **opts):
        root = settings.DATA_CACHE_DIR
        if action in (None, "list"):
            caches = token_cache.list_caches(root)
            for c in caches:
                used = time.strftime("%Y-%m-%d %H:%M", time.localtime(c["last_used"]))
                self.stdout.write(f"{c['name']}  {c['processing']:8}  {c['records']:>10} records  "
                                  f"{c['tokens']:>12} tokens  {c['bytes'] / 1e6:>9.1f} MB  used {used}  "
                                  f"{c['dataset']}")
            total = sum(c["bytes"] for c in caches)
            self.stdout.write(f"{len(caches)} cache(s), {total / 1e9:.2f} GB of {settings.DATA_CACHE_GB:g} GB "
                              f"in {root}")
            left = token_cache.leftovers(root)
            if left:
                self.stdout.write(f"{len(left)} unfinished build(s) that killed processes left, "
                                  f"{sum(x['bytes'] for x in left) / 1e9:.2f} GB (evict, or the housekeeping, "
                                  "removes them)")
            return
        if action == "clear":
            names = [c["name"] for c in token_cache.list_caches(root)] if opts["all"] else opts["names"]
            if not names:
                raise CommandError("name the caches to clear (data_cache list shows them) or give --all")
            for name in names:
                ok = token_cache.remove(root, name)
                self.stdout.write(f"{'removed' if ok else 'kept (being built, or no such cache)'}: {name}")
            return
        cap = opts["gb"] if opts["gb"] is not None else settings.DATA_CACHE_GB
        for name in token_cache.evict(root, int(cap * 1e9)):
            self.stdout.write(f"removed: {name}")
