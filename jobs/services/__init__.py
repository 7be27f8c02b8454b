"""The jobs domain's services, one module per job you can name (docs/architecture.md): submission, quota, the queue, a
job's lifecycle, nodes, datasets and uploads, their statistics, and the wording of reasons. Views, the API, consumers,
tasks and serve call these names from here."""
from minicloud.errors import ServiceError
from minicloud.processes import die_with_parent, kill_group, pid_alive

from .datasets import (append_upload, check_next_upload, check_upload, create_dataset, dataset_records,
                       dataset_references, delete_dataset, delete_upload, find_upload, finish_upload, index_dataset,
                       prune_uploads, remove_cache_leftovers, start_upload, upload_dataset)
from .exports import metrics_csv, metrics_json, tensorboard_zip
from .monitoring import exposition
from .notifications import check_waits, deliver_due, job_event, remember_language, update_integrations
from .lifecycle import _RESUMING, cancel_job, clone_job, finish_job, interrupt_job, pause_job, resume_job, retry_job
from .nodes import (SAMPLES_KEPT, beat, check_shared_storage, end_orphaned, follow_slurm_job, reconcile_background,
                    reconcile_node, refresh_node, register_node, resend_background, sample_devices,
                    take_over_slurm_job)
from .queue import (QUEUE_SNAPSHOT_S, _local_devices, background_queue, background_task, build_spec,
                    claim_next_job, device_state, kick_queue, kick_waiting, live_nodes, node_queue, queue_forecast,
                    queue_info, queue_order, queue_plan, queue_position, queue_snapshot, this_worker, write_spec)
from .quota import (check_submission_quota, device_hours, hours_left, recent_usage, settle_run_segment,
                    usage_summary)
from .statistics import compute_dataset_stats, request_dataset_stats
from .reasons import never_fits_text, spec_error_text, wait_reason_text
from .submission import estimate_job, largest_device_memory, prepare_job, record_event, save_template, submit_job

__all__ = [
    "metrics_csv", "metrics_json", "tensorboard_zip", "exposition", "check_waits", "deliver_due", "job_event",
    "remember_language", "update_integrations",
    "ServiceError", "die_with_parent", "kill_group", "pid_alive", "never_fits_text", "spec_error_text",
    "wait_reason_text", "check_submission_quota", "device_hours", "hours_left", "recent_usage", "settle_run_segment",
    "usage_summary",
    "background_queue", "background_task", "build_spec", "claim_next_job", "device_state", "kick_queue", "kick_waiting",
    "live_nodes",
    "_local_devices", "node_queue", "queue_forecast", "queue_info", "queue_order", "queue_plan", "queue_position",
    "queue_snapshot", "QUEUE_SNAPSHOT_S", "this_worker", "write_spec", "estimate_job", "largest_device_memory",
    "prepare_job",
    "record_event", "save_template", "submit_job", "cancel_job", "clone_job", "finish_job", "interrupt_job",
    "pause_job", "resume_job", "_RESUMING", "retry_job", "beat", "check_shared_storage", "end_orphaned",
    "reconcile_background", "reconcile_node", "resend_background",
    "follow_slurm_job", "take_over_slurm_job", "refresh_node", "register_node", "sample_devices", "SAMPLES_KEPT",
    "append_upload", "check_next_upload", "check_upload", "delete_upload",
    "compute_dataset_stats", "create_dataset", "dataset_records", "dataset_references", "delete_dataset",
    "find_upload", "finish_upload", "index_dataset", "prune_uploads", "remove_cache_leftovers",
    "request_dataset_stats",
    "start_upload", "upload_dataset"
]
