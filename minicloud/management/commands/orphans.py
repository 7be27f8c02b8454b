"""``python manage.py orphans [--delete] [--min-age-hours H]``: files under MINICLOUD_HOME that no record names
(minicloud/orphans.py)."""
from django.core.management.base import BaseCommand

from minicloud import orphans


class Command(BaseCommand):
    help = ("List (or with --delete remove) files under MINICLOUD_HOME that no dataset, job, model, upload or "
            "tokenizer names: what a process killed between a file and its record left behind.")

    def add_arguments(self, parser):
        parser.add_argument("--delete", action="store_true", help="remove them (default: only list them)")
        parser.add_argument("--min-age-hours", type=float, default=1.0,
                            help="only what nothing has written to for this long (default 1: a write in progress "
                                 "may not have its record yet)")

    def handle(self, *args, delete=False, min_age_hours=1.0, **options):
        found = orphans.find(min_age_s=min_age_hours * 3600)
        for orphan in found:
            self.stdout.write(f"{orphan.bytes:>15,d}  {orphan.path}  ({orphan.why})")
        total = sum(o.bytes for o in found)
        if delete:
            freed = orphans.remove(found)
            self.stdout.write(f"removed {len(found)} orphan(s), {freed / 1e9:.2f} GB freed")
        else:
            self.stdout.write(f"{len(found)} orphan(s), {total / 1e9:.2f} GB" +
                              (" (--delete removes them)" if found else ""))
