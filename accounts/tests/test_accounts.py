"""Bulk user import, login rate limiting, API tokens, password change and the production settings check."""
import html
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.files.uploadedfile import SimpleUploadedFile

from accounts.models import ApiToken, AuditEntry

ROOT = Path(__file__).resolve().parents[2]
CSV = "username,name,email,group\nstu1,Li Lei,li@example.org,nlp-101\nstu2,Han Meimei,,nlp-101\n"


def test_admin_imports_users_from_csv_and_shows_passwords_once(client, db, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="root-pass-123")
    client.force_login(admin)
    assert b"Import users from CSV" in client.get("/admin/auth/user/").content
    r = client.post("/admin/auth/user/import/", {"file": SimpleUploadedFile("u.csv", CSV.encode())})
    created = r.context["created"]
    assert [c["username"] for c in created] == ["stu1", "stu2"]
    stu1 = get_user_model().objects.get(username="stu1")
    assert stu1.first_name == "Li" and stu1.groups.get().name == "nlp-101"
    assert stu1.check_password(created[0]["password"]) and created[0]["password"] not in stu1.password  # hashed
    assert AuditEntry.objects.filter(action="users_import").exists()
    again = client.post("/admin/auth/user/import/", {"file": SimpleUploadedFile("u.csv", CSV.encode())})
    assert "line 2: user 'stu1' exists already" in html.unescape(again.content.decode())
    assert get_user_model().objects.filter(username__startswith="stu").count() == 2  # nothing half-done


def test_import_users_command(tmp_path, db, capsys):
    path = tmp_path / "u.csv"
    path.write_text(CSV)
    call_command("import_users", str(path))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "username,password,group" and out[1].startswith("stu1,") and out[1].endswith(",nlp-101")


def test_login_is_rate_limited_per_username_and_address(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    for _ in range(3):
        r = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
        assert r.status_code == 200
    r = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert r.status_code == 200 and "Too many failed logins" in r.content.decode()  # even the right password
    r = client.post("/api/v1/auth/token", {"username": "alice", "password": "alice-pass-123"},
                    content_type="application/json")
    assert r.status_code == 429


def test_tokens_page_creates_shows_once_and_revokes(client, user):
    client.force_login(user)
    r = client.post("/accounts/tokens/", {"name": "laptop"})
    raw = r.context["new_token"]
    assert raw.startswith("mc_") and raw in r.content.decode()
    token = ApiToken.objects.get(user=user, name="laptop")
    assert token.digest != raw and raw not in client.get("/accounts/tokens/").content.decode()  # shown once
    assert client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    first = token.last_used_at  # kept to the minute: a burst of requests is not a burst of writes
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        assert client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200
    assert not any(q["sql"].startswith("UPDATE") for q in queries.captured_queries)
    token.refresh_from_db()
    assert token.last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}")
    token.refresh_from_db()
    assert token.last_used_at > first
    client.post("/accounts/tokens/", {"action": "revoke", "token": token.pk})
    assert client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401
    assert {"token_create", "token_revoke"} <= set(AuditEntry.objects.values_list("action", flat=True))


def test_password_change(client, user):
    client.force_login(user)
    r = client.post("/accounts/password/", {"old_password": "alice-pass-123", "new_password1": "n3w-Secret-pass!",
                                            "new_password2": "n3w-Secret-pass!"})
    assert r.status_code == 302
    user.refresh_from_db()
    assert user.check_password("n3w-Secret-pass!")


def test_deploy_check_is_clean_behind_tls(tmp_path):
    env = dict(os.environ, DEBUG="0", MINICLOUD_TLS="1", ALLOWED_HOSTS="minicloud.example.org",
               MINICLOUD_HOME=str(tmp_path), SECRET_KEY="x" * 60 + "-not-a-default-key-0123456789")
    env.pop("DATABASE_URL", None)
    r = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    out = r.stdout + r.stderr
    warnings = sorted({line.split(")")[0].split("(")[-1] for line in out.splitlines() if "(security." in line})
    assert warnings == ["security.W021"], out  # HSTS preload is left to the operator (docs/security.md)
