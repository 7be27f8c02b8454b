"""``python manage.py workers``: django-q2's cluster (``qcluster``) in which every process dies with its parent.

django-q2 forks its sentinel, monitor, pusher and job runners with multiprocessing; a runner's supervisor forks the
training process. ``serve`` starts this command with a parent-death signal, and here every fork of this process and
of its children asks for one too (os.register_at_fork): when ``serve`` ends, however it ends (kill -9 included), the
cluster's main process ends, then its sentinel, then the runners, then their training processes (the supervisor
starts those with a parent-death signal of their own). No runner lives on to resume a job without its portal.
"""
import os
import signal

from django.core.management import call_command
from django.core.management.base import BaseCommand

from minicloud.processes import die_with_parent


class Command(BaseCommand):
    help = "django-q2's qcluster, each of whose processes dies with its parent (serve starts it)."

    def handle(self, *args, **options):
        os.register_at_fork(after_in_child=die_with_parent(signal.SIGKILL))
        call_command("qcluster")
