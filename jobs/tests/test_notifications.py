"""Notifications: a real SMTP server (aiosmtpd) and a local HTTP receiver get one message per event, signed; a
receiver that is down is retried with backoff, off the job's own path; long waits are told once; per-job choices;
keys and secrets stay encrypted at rest."""
import datetime
import email
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import Dataset, Integrations, Job, MetricPoint, Notification
from models_registry.models import Tokenizer
from tests.live import free_port


class Receiver:
    """A local webhook endpoint that keeps what it is sent."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.got = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((self.headers, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def smtp(settings):
    from aiosmtpd.controller import Controller

    class Handler:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append((envelope.rcpt_tos, email.message_from_bytes(envelope.content)))
            return "250 OK"

    handler = Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", controller.port
    yield handler
    controller.stop()


def _job(user, **fields):
    return Job.objects.create(owner=user, name=fields.pop("name", "long run"), stage="pretrain",
                              dataset=Dataset.objects.get(name="demo-pretrain"),
                              tokenizer=Tokenizer.objects.get(name="demo-tokenizer"), **fields)


def _prefs(user, webhook_url="", **kw):
    return services.update_integrations(user, email_enabled=True, email="me@lab.example", webhook_url=webhook_url,
                                        events=kw.pop("events", ["succeeded", "failed", "paused_quota", "waiting"]),
                                        wait_minutes=kw.pop("wait_minutes", 60), **kw)


def test_success_and_failure_arrive_once_by_mail_and_signed_webhook(user, smtp, settings):
    receiver = Receiver()
    try:
        prefs = _prefs(user, receiver.url)
        job = _job(user, status="running", step=200, total_steps=200)
        MetricPoint.objects.create(job=job, seq=1, step=200, time=1.0, values={"loss": 1.25, "tokens_per_s": 900.0})
        assert services.finish_job(job, Job.S.SUCCEEDED)
        assert not services.finish_job(job, Job.S.SUCCEEDED)  # no second transition, no second message
        assert services.job_event(job, "succeeded") == []  # the same event again: already told
        assert services.deliver_due() == {"sent": 2, "retry": 0, "failed": 0}
        assert services.deliver_due() == {"sent": 0, "retry": 0, "failed": 0}
        failed = _job(user, name="broken", status="running")
        services.finish_job(failed, Job.S.FAILED, error="loss is nan at step 3")
        services.deliver_due()
    finally:
        receiver.close()
    assert [m["Subject"] for _, m in smtp.messages] == [f"[MiniCloud] job #{job.pk} long run succeeded",
                                                        f"[MiniCloud] job #{failed.pk} broken failed"]
    assert smtp.messages[0][0] == ["me@lab.example"]
    text = smtp.messages[0][1].get_payload()
    assert "loss: 1.25" in text and f"{settings.PUBLIC_URL}/jobs/{job.pk}/" in text
    assert len(receiver.got) == 2
    headers, body = receiver.got[0]
    secret = prefs.secret("webhook_secret")
    assert headers["X-MiniCloud-Signature"] == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    data = json.loads(body)
    assert data["event"] == "succeeded" and data["job"]["id"] == job.pk and data["job"]["status"] == "succeeded"
    assert data["metrics"] == {"loss": 1.25, "tokens_per_s": 900.0} and data["url"].endswith(f"/jobs/{job.pk}/")
    assert json.loads(receiver.got[1][1])["job"]["error"] == "loss is nan at step 3"


def test_a_receiver_that_is_down_is_retried_with_backoff_without_blocking_the_job(user, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # no mail server there either
    port = free_port()
    _prefs(user, f"http://127.0.0.1:{port}/hook")
    job = _job(user, status="running")
    start = time.monotonic()
    services.finish_job(job, Job.S.FAILED, error="boom")
    assert time.monotonic() - start < 2  # the job's own path only records the notifications
    now = timezone.now()
    assert services.deliver_due(now) == {"sent": 0, "retry": 2, "failed": 0}
    hook = Notification.objects.get(channel="webhook")
    assert hook.attempts == 1 and hook.status == "pending" and "refused" in hook.last_error.lower()
    assert (hook.next_attempt_at - now).total_seconds() == pytest.approx(30, abs=1)
    assert services.deliver_due(now + datetime.timedelta(seconds=10)) == {"sent": 0, "retry": 0, "failed": 0}
    later = now + datetime.timedelta(seconds=31)
    services.deliver_due(later)
    hook.refresh_from_db()
    assert hook.attempts == 2 and (hook.next_attempt_at - later).total_seconds() == pytest.approx(120, abs=1)
    receiver = Receiver(port)  # the receiver comes back
    try:
        counts = services.deliver_due(later + datetime.timedelta(seconds=121))
    finally:
        receiver.close()
    assert counts["sent"] == 1 and len(receiver.got) == 1
    hook.refresh_from_db()
    assert hook.status == "sent" and hook.attempts == 3
    mail = Notification.objects.get(channel="email")  # still down: given up after the last backoff
    t = later + datetime.timedelta(seconds=121)
    for _ in range(10):
        t += datetime.timedelta(hours=7)
        services.deliver_due(t)
    mail.refresh_from_db()
    assert mail.status == "failed" and mail.attempts == len(services.notifications.BACKOFF_S)


def test_a_long_wait_is_told_once_and_each_job_may_choose_its_events(user, smtp):
    _prefs(user, wait_minutes=30)
    old = _job(user, name="waiting", created_at=timezone.now() - datetime.timedelta(minutes=31))
    _job(user, name="fresh")
    assert services.check_waits() == 1 and services.check_waits() == 0
    quiet = _job(user, name="quiet", status="running", notify=[])
    only_failures = _job(user, name="picky", status="running", notify=["failed"])
    services.finish_job(quiet, Job.S.FAILED)
    services.finish_job(only_failures, Job.S.SUCCEEDED)
    paused = _job(user, name="over quota", status="paused")
    assert len(services.job_event(paused, "paused_quota")) == 1
    services.deliver_due()
    subjects = sorted(m["Subject"] for _, m in smtp.messages)
    assert subjects == sorted([f"[MiniCloud] job #{old.pk} waiting has waited 31 minutes in the queue",
                               f"[MiniCloud] job #{paused.pk} over quota is paused: quota used up"])


def test_submission_takes_per_job_events_and_trackers(api, user):
    ds = Dataset.objects.get(name="demo-pretrain")
    r = api.post("/api/v1/jobs", {"name": "n", "stage": "pretrain", "dataset": ds.pk, "config": {"max_steps": 1},
                                  "notify": ["failed"], "trackers": {"wandb": {"mode": "offline"}}})
    assert r.status_code == 201 and r.json()["notify"] == ["failed"]
    assert r.json()["trackers"] == {"wandb": {"project": "minicloud", "mode": "offline"}}
    bad = api.post("/api/v1/jobs", {"name": "n", "stage": "pretrain", "dataset": ds.pk, "notify": ["sometimes"]})
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "notify"
    online = api.post("/api/v1/jobs", {"name": "n", "stage": "pretrain", "dataset": ds.pk,
                                       "trackers": {"swanlab": {"mode": "online"}}})
    assert online.status_code == 400 and "API key" in online.json()["error"]


def test_the_settings_page_keeps_keys_encrypted_and_never_shows_them(client, user):
    client.force_login(user)
    r = client.post("/accounts/integrations/", {"email_enabled": "on", "email": "", "webhook_url":
                                                "https://hooks.lab.example/x", "events": ["failed"],
                                                "wait_minutes": 45, "wandb_key": "wandb-secret-123"})
    assert r.status_code == 302
    prefs = Integrations.objects.get(user=user)
    assert prefs.events == ["failed"] and prefs.wait_minutes == 45
    assert prefs.wandb_key and "wandb-secret-123" not in prefs.wandb_key  # ciphertext at rest
    assert prefs.secret("wandb_key") == "wandb-secret-123" and len(prefs.secret("webhook_secret")) > 30
    page = client.get("/accounts/integrations/").content.decode()
    assert "wandb-secret-123" not in page and 'id="wandb-set"' in page and prefs.secret("webhook_secret") in page
    client.post("/accounts/integrations/", {"webhook_url": "https://hooks.lab.example/x", "events": ["failed"],
                                            "wait_minutes": 45, "wandb_key": ""})
    assert Integrations.objects.get(user=user).secret("wandb_key") == "wandb-secret-123"  # blank keeps it
    client.post("/accounts/integrations/", {"wait_minutes": 45, "clear_wandb": "on"})
    assert Integrations.objects.get(user=user).wandb_key == ""
    bad = client.post("/accounts/integrations/", {"webhook_url": "not a url", "wait_minutes": 0})
    assert bad.status_code == 200 and 'class="error"' in bad.content.decode()
    zh = client.get("/accounts/integrations/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "通知" in zh


def test_mail_is_written_in_the_language_the_settings_were_saved_in(client, user, smtp):
    """The worker that sends a notification has no request: the language is the one the owner's settings page was
    shown in when they were saved."""
    client.force_login(user)
    r = client.post("/accounts/integrations/", {"email_enabled": "on", "email": "me@lab.example",
                                                "events": ["failed"], "wait_minutes": 60},
                    HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 302 and Integrations.objects.get(user=user).language == "zh-hans"
    job = _job(user, name="broken", status="running")
    services.finish_job(job, Job.S.FAILED, error="could not register the model: %(error)s",
                        error_params={"error": "disk full"})
    assert services.deliver_due()["sent"] == 1
    (to, mail), = smtp.messages
    body = mail.get_payload(decode=True).decode()
    from email.header import decode_header, make_header

    assert str(make_header(decode_header(mail["Subject"]))) == f"[MiniCloud] 任务 #{job.pk} broken 已失败"
    assert "阶段" in body and "disk full" in body and "could not register" not in body, body
    client.post("/accounts/integrations/", {"email_enabled": "on", "email": "me@lab.example", "events": ["failed"],
                                            "wait_minutes": 60}, HTTP_ACCEPT_LANGUAGE="en")
    assert Integrations.objects.get(user=user).language == "en"
    # switching the portal's language switches the notifications' too
    r = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"})
    assert r.status_code == 302 and r.cookies["django_language"].value == "zh-hans"
    assert Integrations.objects.get(user=user).language == "zh-hans"
    client.post("/i18n/setlang/", {"language": "klingon", "next": "/"})
    assert Integrations.objects.get(user=user).language == "zh-hans"
