"""Create users from a CSV file (username,name,email,group) and print their generated passwords once."""
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.services import bulk_create_users, read_users_csv
from minicloud.errors import ServiceError


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("csv", help="a CSV file with a header line: username,name,email,group")

    def handle(self, *args, **options):
        try:
            created = bulk_create_users(read_users_csv(Path(options["csv"]).read_text(encoding="utf-8-sig")))
        except (OSError, ServiceError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write("username,password,group")
        for row in created:
            self.stdout.write(f"{row['username']},{row['password']},{row['group']}")
