"""django-q2 entry points only: each is a thin interface to services (docs/architecture.md, "The processes")."""
from django.conf import settings

from . import services
from .supervisor import Supervisor


def run_next_job():
    """Claim and supervise queued jobs until none fits this node; a stale or duplicate token does nothing."""
    slots = len(services._local_devices())
    ran = []
    while True:
        job = services.claim_next_job(settings.NODE_NAME, slots)
        if job is None:
            return ran
        services.kick_waiting([settings.NODE_NAME])  # another free runner takes the next queued job meanwhile
        Supervisor(job).run()
        ran.append(job.pk)


def follow_slurm_job(job_id, generation):
    """Follow a Slurm run that its supervisor left (this node restarted, or its worker died)."""
    job = services.take_over_slurm_job(job_id, generation)
    if job is not None:
        Supervisor(job, attach=True).run()
    return job_id


def housekeeping():
    """Periodic: refresh this node's device readings, remove what killed token-cache builds left, recover jobs whose
    supervisor died (a killed worker), end the background work whose worker died, and start any queued job or
    background work a lost token left waiting."""
    services.refresh_node(settings.NODE_NAME)
    services.prune_uploads()
    services.remove_cache_leftovers()
    services.resend_background()
    services.reconcile_node(settings.NODE_NAME, starting=False)
    services.reconcile_background(settings.NODE_NAME, starting=False)
    services.kick_waiting()
    services.check_waits()
    services.deliver_due()


def deliver_notifications():
    """Send the notifications that are due (queued at each event; the housekeeping retries the failed ones)."""
    return services.deliver_due()


def check_upload(upload_id):
    """A large finished upload checked and stored as a dataset version, in the background: the next waiting one in
    fair order (this task was sent when ``upload_id`` was finished)."""
    services.check_next_upload(upload_id)


def index_dataset(ds_id):
    """What a dataset's preview needs to read any page (a gzip file's seek points; the record index of a file stored
    before indexes were), in the background."""
    return services.index_dataset(ds_id)


def dataset_stats(ds_id, max_seq_len=None, tokenizer_id=None, request=None):
    """Token statistics of a dataset version, in the background."""
    services.compute_dataset_stats(ds_id, max_seq_len, tokenizer_id, request)
