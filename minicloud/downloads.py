"""File downloads that stream and resume: HTTP Range (one range) with If-Range, for the large model files.

Django's FileResponse streams a file but answers every Range request with the whole file (200), so an interrupted
multi-gigabyte download starts over. This answers ``Range: bytes=a-b`` / ``a-`` / ``-n`` with 206 and the slice,
416 for a range past the end, and falls back to the whole file when the file changed since (If-Range).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.utils.http import http_date, quote_etag

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _etag(stat) -> str:
    return quote_etag(f"{stat.st_size:x}-{int(stat.st_mtime_ns):x}")


def _slice(path: Path, start: int, length: int):
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            data = f.read(min(CHUNK, length))
            if not data:
                return
            length -= len(data)
            yield data


def _content_disposition(filename: str) -> str:
    from urllib.parse import quote

    return f"attachment; filename*=UTF-8''{quote(filename)}"


def serve_file(request, path: Path, filename: str, content_type: str = "application/octet-stream"):
    """Stream ``path`` as an attachment, honouring a single byte range."""
    path = Path(path)
    stat = os.stat(path)
    size, etag = stat.st_size, _etag(stat)
    header = request.headers.get("Range", "")
    if_range = request.headers.get("If-Range", "")
    m = _RANGE.match(header.replace(" ", "")) if header else None
    if m and (not if_range or if_range in (etag, http_date(stat.st_mtime))):
        first, last = m.groups()
        if first == "" and last == "":
            m = None
        elif first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if m is not None:
            if start >= size or start > end:
                resp = HttpResponse(status=416)
                resp["Content-Range"] = f"bytes */{size}"
                return resp
            resp = StreamingHttpResponse(_slice(path, start, end - start + 1), status=206,
                                         content_type=content_type)
            resp["Content-Range"] = f"bytes {start}-{end}/{size}"
            resp["Content-Length"] = str(end - start + 1)
            resp["Content-Disposition"] = _content_disposition(filename)
            resp["Accept-Ranges"] = "bytes"
            resp["ETag"] = etag
            return resp
    resp = FileResponse(open(path, "rb"), as_attachment=True, filename=filename, content_type=content_type)
    resp["Accept-Ranges"] = "bytes"
    resp["ETag"] = etag
    resp["Last-Modified"] = http_date(stat.st_mtime)
    return resp
