"""A job's life after submission: cancel, pause, resume, retry (with half the batch), clone, finish and interrupt."""
from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils.translation import gettext as _, gettext_noop

from minicloud.errors import ServiceError
from training import spec as tspec

from ..models import Job, clip_params
from .queue import kick_queue
from .quota import check_submission_quota
from .submission import _memory_need, submit_job


def _who(actor) -> str:
    return getattr(actor, "username", str(actor))


def _refuse(job: Job, action: str):
    states = [str(s) for s in Job.USER_ACTIONS[action]]
    allowed = ", ".join(states[:-1]) + f" or {states[-1]}" if len(states) > 1 else states[0]
    raise ServiceError(
        _("job %(pk)s is %(status)s; %(action)s needs a %(allowed)s job")
        % {"pk": job.pk, "status": job.status, "action": action, "allowed": allowed},
        status=409,
    )


def _user_action(job: Job, action: str, actor) -> Job:
    """Move the job as ``Job.USER_ACTIONS[action]`` says for its status, or refuse (409)."""
    job.refresh_from_db()
    target = Job.USER_ACTIONS[action].get(job.status)
    if target is None or not job.transition(target, _who(actor)):
        _refuse(job, action)
    return job


def cancel_job(job: Job, actor) -> Job:
    """Queued/paused/interrupted: cancelled at once. Running/pausing: cancelling (the supervisor stops it)."""
    return _user_action(job, "cancel", actor)


def pause_job(job: Job, actor) -> Job:
    """Running: checkpoint, free the device, keep the place (pausing → paused). Queued: paused at once."""
    return _user_action(job, "pause", actor)


# The history's notes for a job put back in the queue, and the same when it continues from its checkpoint.
_RESUMING = {
    gettext_noop("resumed"): gettext_noop("resumed (continues from its last checkpoint)"),
    gettext_noop("retry"): gettext_noop("retry (continues from its last checkpoint)"),
    gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s"): gettext_noop(
        "retry with batch size %(batch_from)s → %(batch_to)s (continues from its last checkpoint)"),
    gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → "
                 "%(acc_to)s"): gettext_noop(
        "retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → %(acc_to)s "
        "(continues from its last checkpoint)"),
    gettext_noop("requeued after the node stopped"): gettext_noop(
        "requeued after the node stopped (continues from its last checkpoint)"),
    gettext_noop("requeued after Slurm preempted it"): gettext_noop(
        "requeued after Slurm preempted it (continues from its last checkpoint)"),
    gettext_noop("automatic resume %(n)s/%(limit)s"): gettext_noop(
        "automatic resume %(n)s/%(limit)s (continues from its last checkpoint)"),
}


def _requeue(job: Job, actor: str, message: str, params: dict | None = None) -> bool:
    resume = job.checkpoint_path.exists()
    said = _RESUMING.get(message, message) if resume else message  # (each requeue's words have their resuming form)
    ok = job.transition(Job.Status.QUEUED, actor, said, params or {}, resume=resume, pid=None, worker_pid=None,
                        node="", devices=[], finished_at=None)
    if ok:
        transaction.on_commit(kick_queue)
    return ok


def resume_job(job: Job, actor) -> Job:
    job.refresh_from_db()
    check_submission_quota(job.owner, job.gpus, None, requeue=True)
    if job.status not in Job.USER_ACTIONS["resume"] or not _requeue(job, _who(actor), "resumed"):
        _refuse(job, "resume")
    return job


def retry_job(job: Job, actor, half_batch: bool = False) -> Job:
    """A failed or interrupted job goes back to the queue, continuing from its last checkpoint when it has one.
    ``half_batch`` (after running out of memory): with half the batch size and twice the accumulation steps, the same
    effective batch in less memory; the engine continues at the same row of its data."""
    job.refresh_from_db()
    check_submission_quota(job.owner, job.gpus, None, requeue=True)
    if job.status not in Job.USER_ACTIONS["retry"]:
        _refuse(job, "retry")
    with transaction.atomic():
        message, params = gettext_noop("retry"), {}
        if half_batch:
            message, params = _halve_batch(job)
        if not _requeue(job, _who(actor), message, params):
            _refuse(job, "retry")  # moved meanwhile: the halved batch rolls back with it
    return job


def _halve_batch(job: Job) -> tuple[str, dict]:
    """Half the job's batch size, twice its accumulation steps, and its memory estimate for that; returns what
    changed, for the job's history (a template and its parameters)."""
    cfg = job.resolved_config
    if not job.batch_can_shrink:
        raise ServiceError(
            _("config.batch_size: the batch size is 1 already; it cannot be halved"), field="config.batch_size"
        )
    changes = tspec.halved_batch(job.stage, cfg)
    resolved = {**cfg, **changes}
    memory = _memory_need(job.stage, resolved, job.teacher_model)[2]["bytes"]
    Job.objects.filter(pk=job.pk).update(config={**job.config, **changes}, resolved_config=resolved,
                                         memory_estimate=memory)
    job.refresh_from_db()
    params = {"batch_from": cfg["batch_size"], "batch_to": changes["batch_size"],
              "acc_from": cfg["accumulation_steps"], "acc_to": changes["accumulation_steps"]}
    if params["acc_from"] == params["acc_to"]:  # PPO takes fewer rollouts per step instead
        return gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s"), params
    return gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → "
                        "%(acc_to)s"), params


def clone_job(job: Job, actor, name: str | None = None, **changes) -> Job:
    """A new queued job with the same stage, data, models and configuration. ``changes`` (``submit_job``'s
    arguments) edit the copy before it is submitted; a ``config`` there is merged over the job's."""
    if "config" in changes:
        if not isinstance(changes["config"], dict):
            raise ServiceError(_("config: must be a JSON object"), field="config")
        changes["config"] = {**job.config, **changes["config"]}
    return submit_job(**{"owner": actor, "name": name or f"{job.name} (copy)", "stage": job.stage,
                         "dataset": job.dataset_id, "eval_dataset": job.eval_dataset_id, "config": job.config,
                         "base_model": job.base_model_id, "teacher_model": job.teacher_model_id,
                         "tokenizer": job.tokenizer_id, "priority": job.priority, "gpus": job.gpus,
                         "time_limit_s": job.time_limit_s, **changes})


def finish_job(job: Job, status: str, *, error: str = "", error_params: dict | None = None, output_model=None,
               actor: str = "") -> bool:
    """``error``: the engine's one line as it is, or the portal's own English template (marked with gettext_noop)
    with ``error_params``, which the job's readers see in their language."""
    from .notifications import job_event

    params = clip_params(error_params)
    done = job.transition(status, actor or job.node, error[:500], params, error=error[:4000], error_params=params,
                          pid=None, worker_pid=None, output_model=output_model)
    if done and status in (Job.S.SUCCEEDED, Job.S.FAILED):
        job_event(job, status)
    return done


def interrupt_job(job: Job, reason: str, params: dict | None = None, *, counts: bool = True,
                  requeued: str = gettext_noop("requeued after the node stopped")) -> None:
    """The job's process stopped without finishing: mark it interrupted, and requeue it to resume from its last
    checkpoint. After a crash (``counts``) only while the automatic-resume budget (MINICLOUD_AUTO_RESUME, default 1)
    lasts; what is not the job's doing (a clean node shutdown, Slurm preempting it) always requeues, saying
    ``requeued``. One transaction: nobody sees a requeued job as interrupted (its history keeps both events)."""
    with transaction.atomic():
        if not job.transition(Job.Status.INTERRUPTED, "system", reason, params or {}, pid=None, worker_pid=None):
            return
        if not counts:
            _requeue(job, "system", requeued)
        elif job.auto_resumes < settings.AUTO_RESUME_LIMIT:
            Job.objects.filter(pk=job.pk).update(auto_resumes=F("auto_resumes") + 1)
            job.refresh_from_db()
            _requeue(job, "system", gettext_noop("automatic resume %(n)s/%(limit)s"),
                     {"n": job.auto_resumes, "limit": settings.AUTO_RESUME_LIMIT})
