"""The portal's state as Prometheus metrics, read from the database at each scrape (``/metrics``, minicloud.metrics):
the queue by stage, jobs by state, devices (running jobs, their memory, GPU utilisation and memory from the nodes'
last readings), each running job's training tokens/s, job outcomes, and the chats at the answering web node's
generation worker (asked on its socket)."""
from __future__ import annotations

from django.db.models import Count
from django.utils import timezone

from ..models import DeviceSample, Job, MetricPoint, Node
from .queue import live_jobs_by_device

FINISHED = (Job.S.SUCCEEDED, Job.S.FAILED, Job.S.CANCELLED, Job.S.INTERRUPTED)


class PortalCollector:
    """A prometheus_client collector (``collect()`` yields metric families); nothing is kept between scrapes."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = timezone.now()
        queued = GaugeMetricFamily("minicloud_queue_jobs", "Jobs waiting in the queue", labels=["stage"])
        oldest = GaugeMetricFamily("minicloud_queue_wait_seconds_max",
                                   "How long the longest-waiting queued job has waited", labels=["stage"])
        mean = GaugeMetricFamily("minicloud_queue_wait_seconds_mean", "Mean wait of the queued jobs so far",
                                 labels=["stage"])
        waits: dict[str, list[float]] = {}
        for stage, created in Job.objects.filter(status=Job.S.QUEUED).values_list("stage", "created_at"):
            waits.setdefault(stage, []).append((now - created).total_seconds())
        for stage, w in sorted(waits.items()):
            queued.add_metric([stage], len(w))
            oldest.add_metric([stage], max(w))
            mean.add_metric([stage], sum(w) / len(w))
        yield from (queued, oldest, mean)

        by_state = GaugeMetricFamily("minicloud_jobs", "Jobs by state", labels=["state"])
        counts = dict(Job.objects.values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
        for state in Job.Status.values:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state

        outcomes = CounterMetricFamily("minicloud_job_outcomes", "Finished jobs by stage and outcome",
                                       labels=["stage", "outcome"])
        for stage, status, n in (Job.objects.filter(status__in=FINISHED).values_list("stage", "status")
                                 .annotate(n=Count("pk")).values_list("stage", "status", "n")):
            outcomes.add_metric([stage, status], n)
        yield outcomes

        yield from self._devices()
        yield self._throughput()
        yield from self._chats()

    def _chats(self):
        """The chats at this node's generation worker (the web node answering the scrape), where it has one."""
        from django.conf import settings
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from minicloud.metrics import chat_worker_stats

        chats = GaugeMetricFamily("minicloud_chats", "Chats (playground, /v1/chat/completions) at the node's "
                                  "generation worker: generating, or waiting for their turn", labels=["node", "state"])
        users = GaugeMetricFamily("minicloud_chat_users", "Users with chats at the node's generation worker",
                                  labels=["node"])
        models = GaugeMetricFamily("minicloud_chat_models", "Models loaded at the node's generation worker",
                                   labels=["node"])
        loads = CounterMetricFamily("minicloud_chat_model_loads", "Model loads begun by the node's generation worker "
                                    "(rising while the loaded models stay few: MINICLOUD_CHAT_MODELS_GB is too small)",
                                    labels=["node"])
        stats = chat_worker_stats()
        if stats is not None:  # else no samples (no worker answers this process)
            node = settings.NODE_NAME
            chats.add_metric([node, "generating"], stats["running"])
            chats.add_metric([node, "waiting"], stats["waiting"])
            users.add_metric([node], len(stats["held"]))
            models.add_metric([node], stats.get("models", 0))
            loads.add_metric([node], stats.get("model_loads", 0))
        yield from (chats, users, models, loads)

    def _devices(self):
        from prometheus_client.core import GaugeMetricFamily

        labels = ["node", "device", "kind"]
        running = GaugeMetricFamily("minicloud_device_running_jobs", "Running jobs per device", labels=labels)
        reserved = GaugeMetricFamily("minicloud_device_job_memory_bytes",
                                     "Memory the running jobs on a device need (their estimates)", labels=labels)
        util = GaugeMetricFamily("minicloud_device_utilization_percent", "GPU utilisation (NVML)", labels=labels)
        used = GaugeMetricFamily("minicloud_device_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
        total = GaugeMetricFamily("minicloud_device_memory_total_bytes", "Device memory", labels=labels)
        jobs = live_jobs_by_device()
        cutoff = Node.heartbeat_cutoff()
        for node in Node.objects.filter(heartbeat_at__gte=cutoff):
            sample = DeviceSample.objects.filter(node=node.name).order_by("-time").first()
            readings = {r[0]: r for r in (sample.readings if sample else [])}
            for d in node.devices:
                key = [node.name, str(d["index"]), d.get("kind", "")]
                on = jobs.get((node.name, d["index"]), [])
                running.add_metric(key, len(on))
                reserved.add_metric(key, sum(on))
                if d.get("memory_total"):
                    total.add_metric(key, d["memory_total"])
                r = readings.get(d["index"])
                if d.get("kind") == "cuda" and r:
                    if r[1] is not None:
                        util.add_metric(key, r[1])
                    if r[2] is not None:
                        used.add_metric(key, r[2])
        yield from (running, reserved, util, used, total)

    def _throughput(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("minicloud_job_tokens_per_second", "Training tokens/s of each running job (its last "
                              "logged step)", labels=["job", "stage", "owner", "node"])
        for job in Job.objects.filter(status=Job.S.RUNNING).select_related("owner"):
            point = (MetricPoint.objects.filter(job=job, values__has_key="tokens_per_s").order_by("-seq")
                     .values_list("values", flat=True).first())
            if point:
                g.add_metric([str(job.pk), job.stage, job.owner.username if job.owner else "", job.node],
                             float(point["tokens_per_s"]))
        return g


def exposition() -> bytes:
    """The text Prometheus reads: the portal's state and the web request latency."""
    from prometheus_client import CollectorRegistry, generate_latest

    from minicloud.metrics import latency_exposition

    registry = CollectorRegistry()
    registry.register(PortalCollector())
    return generate_latest(registry) + latency_exposition()
