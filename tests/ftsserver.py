"""An FTS3 REST stand-in that really copies files between loopback storage servers.

Written from FTS3's REST documentation (fts-rest ``docs/api-curl.md``: submission
format, job and file JSON) and the behaviour of fts-rest-flask (routes, errors,
job/file states, token handling) and of the FTS3 server (final job state);
notes in /work/notes/stands.md.  One listener on 127.0.0.1, port 0 (HTTP, or
HTTPS with ``tls=``), built on tests/httpdouble.py.

Usage::

    with FTSServer(token="fts-tok") as fts:          # fts.url
        fts.add_outcome("*/broken.bin", fail="Connection reset by peer", times=1)
        ...  # a client POSTs {fts.url}/jobs and polls {fts.url}/jobs/{id}
        job = fts.wait(job_id)                       # the job dict once terminal
        assert fts.find(method="POST", path="/jobs")[0].json["params"]["retry"] == 2

Constructor ``FTSServer(token="fts-token", *, tokens=None, vo="cta",
storage_tokens=None, storage_ca=None, tls=None, client_ca=None, max_active=2,
require_delegation=False, submit_host="fts3-stand-in.local")``; plain
attributes.  ``start()``/``stop()`` or the context manager.

Authentication (as fts-rest: a bearer token, or a client certificate):
``Authorization: Bearer <t>`` with ``t == token`` or ``t in tokens`` (a dict
token -> subject, used as ``user_dn``) -> method "oauth2"; a wrong token -> 403
``Invalid credentials``.  With ``tls=(certfile, keyfile)`` and ``client_ca=``
a client certificate signed by that CA is accepted (method "certificate",
``user_dn`` "/CN=..."); real FTS also needs a delegated proxy before it accepts
a job from a certificate user: with ``require_delegation=True`` a submission
needs ``fts.delegate(user_dn, seconds)`` first (else 419 "No delegation found",
"...expired...", "...less than one hour left", as fts-rest), and ``GET
/delegation/{delegation_id}`` answers ``{"termination_time", "voms_attrs"}`` or
``null`` (making a delegation, i.e. signing the server's CSR with the proxy, is
not emulated: the Python standard library cannot sign one).  Nothing -> 401
``A valid X509 certificate or proxy is needed``.  Errors are
``{"status": "<code> <name>", "message": ...}`` as fts-rest-flask sends them.

Routes: ``POST /jobs`` (Content-Type application/json, else 400) ->
``{"job_id"}``; ``GET /jobs`` (the user's unfinished jobs; ``state_in=A,B``);
``GET /jobs/{id}[,{id}...]`` (job JSON with ``http_status``; ``?files=f1,f2``
adds those file fields; several ids -> a list, 207 if one fails);
``GET /jobs/{id}/files``; ``GET /jobs/{id}/files/{file_id}/retries``;
``DELETE /jobs/{id}[,...]`` (cancel: the job with job_state CANCELED, or its
terminal state and ``http_status`` "304 Not Modified"); ``DELETE
/jobs/{id}/files/{file_id}[,...]``; ``GET /whoami``; ``GET /delegation/{id}``.
Field names are the ones fts-rest-flask serialises (``job_state``,
``file_state``, ``source_surl``, ``dest_surl``, ``filesize``, ``user_filesize``,
``checksum``, ``reason``, ``retry``, ``verify_checksum`` ("b"/"t"/"s"/"d"/"n"),
``overwrite_flag``, times as ``YYYY-MM-DDTHH:MM:SS`` UTC...).  FTS3 has no limit on files per job, nor
has this stand-in.  Multiple sources per file (replica jobs), multihop,
staging (``bring_online``) and making delegations are not emulated
(multi-source submissions -> 400 saying so).

Transfers.  Files run in submission order, ``max_active`` at a time, each:
SUBMITTED -> ACTIVE -> FINISHED | FAILED | CANCELED (jobs: SUBMITTED -> ACTIVE
-> FINISHED | FAILED | FINISHEDDIRTY | CANCELED, decided as the FTS3 server
does).  A copy is streamed through the stand-in (gfal2's fallback when no
third-party copy is possible): HEAD of the destination (exists and no
``overwrite`` -> FAILED, else DELETE it first), GET of the source with
``Want-Digest: adler32``, PUT to the destination (MKCOL of missing parents after
a 409), then, with checksum verification, the destination's adler32 (its
``Digest``, or read back when it sends none) compared with the source's (its
``Digest``, or the bytes read) and with the user's ``checksum``
("adler32:<hex>"); a mismatch deletes the destination copy.  Credentials for
the storage: the file's ``source_tokens``/``destination_tokens``, else
``storage_tokens["http://host:port"]`` (what FTS would obtain for that storage:
a token exchanged for a token user, a delegated proxy for a certificate user),
else the submitter's own bearer token (FTS's "single token" users, to whom
FTS adds it as source and destination token); ``Authorization`` is not sent across
redirects to another origin.  Only loopback hosts are contacted (anything
else -> FAILED).  ``davs``/``https`` use ``storage_ca`` (a CA file) to verify.
A recoverable failure is retried ``params.retry`` times after
``params.retry_delay`` seconds (``retry`` counts attempts, ``/retries`` lists
the reasons).

Test hooks: ``add_outcome(pattern, fail=None, delay=0.0, times=None,
recoverable=True)`` (fnmatch on ``source_surl`` or ``dest_surl``; ``delay``
real seconds before the copy, ``fail`` a reason instead of the copy; the first
matching outcome with uses left applies to an attempt) -> an ``Outcome``
(``.hits``).  ``wait(job_id, timeout=10)`` -> the job dict once terminal.
``requests`` (``tapeserver.Record`` objects: ``method``, ``path``, ``query``,
``headers`` with Authorization redacted, ``authorized``, ``body``, ``json``,
``status``), ``find(method=None, path=None)``, ``count(...)``, ``jobs`` (job_id
-> job dict), ``transfers`` (one dict per attempt: ``file_id``, ``source``,
``destination``, ``outcome``, ``reason``), ``errors`` (tracebacks of stand-in bugs in
the handler or the copy workers; should stay []).
"""

import fnmatch
import hashlib
import http.client
import ipaddress
import json
import ssl
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import deque
from urllib.parse import parse_qs, quote, unquote, urlsplit

from httpdouble import BUFSIZE, DoubleHandler, ServerDouble
from tapeserver import Record

__all__ = ["FTSServer", "Outcome"]

JOB_ACTIVE = ("STAGING", "SUBMITTED", "READY", "ACTIVE", "DELETE", "ARCHIVING",
              "QOS_TRANSITION", "QOS_REQUEST_SUBMITTED")
JOB_TERMINAL = ("FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED")
FILE_ACTIVE = ("STAGING", "STARTED", "SUBMITTED", "READY", "ACTIVE", "ARCHIVING",
               "QOS_TRANSITION", "QOS_REQUEST_SUBMITTED", "FORCE_START")
FILE_TERMINAL = ("FINISHED", "FAILED", "CANCELED")
DEFAULT_PARAMS = {"bring_online": -1, "archive_timeout": -1, "verify_checksum": False,
                  "copy_pin_lifetime": -1, "gridftp": "", "job_metadata": None,
                  "overwrite": False, "dst_file_report": False, "reuse": None,
                  "multihop": False, "source_spacetoken": "", "destination_spacetoken": "",
                  "retry": 0, "retry_delay": 0, "priority": 3, "max_time_in_queue": 0}
_REASONS = {200: "Ok", 207: "Multi-Status", 304: "Not Modified", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 419: "Authentication Timeout"}
_DN_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "domainComponent": "DC", "localityName": "L",
             "stateOrProvinceName": "ST"}
_SCHEMES = {"http": "http", "dav": "http", "https": "https", "davs": "https"}
FAILED_JOB_REASON = "One or more files failed. Please have a look at the details for more information"


def _utc(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


class Outcome(object):
    """A per-file outcome injected by a test (see the module docstring)."""

    def __init__(self, pattern, fail=None, delay=0.0, times=None, recoverable=True):
        self.pattern, self.fail, self.delay = pattern, fail, delay
        self.times, self.recoverable, self.hits = times, recoverable, 0

    def matches(self, row):
        if self.times is not None and self.hits >= self.times:
            return False
        return any(fnmatch.fnmatchcase(row[k], self.pattern) for k in ("source_surl", "dest_surl"))


class _HTTPError(Exception):
    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status, self.message = status, message


class _CopyFailed(Exception):
    def __init__(self, reason, recoverable=True):
        Exception.__init__(self, reason)
        self.reason, self.recoverable = reason, recoverable


class _Canceled(Exception):
    pass


class FTSServer(ServerDouble):
    """FTS3 REST stand-in; see the module docstring."""

    def __init__(self, token="fts-token", tokens=None, vo="cta", storage_tokens=None,
                 storage_ca=None, tls=None, client_ca=None, max_active=2,
                 require_delegation=False, submit_host="fts3-stand-in.local"):
        ServerDouble.__init__(self)
        self.tokens = dict(tokens or {})
        if token is not None:
            self.tokens.setdefault(token, "ctadata-test-user")
        self.vo = vo
        self.storage_tokens = dict(storage_tokens or {})
        self.storage_ca = storage_ca
        self.max_active = max_active
        self.require_delegation = require_delegation
        self.submit_host = submit_host
        self.lock = threading.RLock()
        self.requests = []
        self.jobs = {}
        self.transfers = []
        self.errors = []
        self.outcomes = []
        self.delegations = {}       # user_dn -> expiry (epoch seconds)
        self._files = {}            # file_id -> row
        self._retries = {}          # file_id -> [retry log rows]
        self._queue = deque()       # (ready_at, file_id)
        self._wakeup = threading.Condition(self.lock)
        self._next_file_id = 1
        self._stopping = threading.Event()
        self._workers = []
        self._server_ctx = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            if client_ca is not None:
                ctx.load_verify_locations(client_ca)
                ctx.verify_mode = ssl.CERT_OPTIONAL
            self._server_ctx = ctx

    # ------------------------------------------------------------ life cycle
    def start(self):
        ServerDouble.start(self)
        if self._server_ctx is not None:
            self.url = "https://127.0.0.1:%d" % self.port
        for i in range(self.max_active):
            t = threading.Thread(target=self._worker, name="fts-worker-%d" % i, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self):
        self._stopping.set()
        with self.lock:
            self._wakeup.notify_all()
        for t in self._workers:
            t.join(5)
        ServerDouble.stop(self)

    # ------------------------------------------------------------ test hooks
    def add_outcome(self, pattern, fail=None, delay=0.0, times=None, recoverable=True):
        outcome = Outcome(pattern, fail, delay, times, recoverable)
        with self.lock:
            self.outcomes.append(outcome)
        return outcome

    def delegate(self, user_dn, seconds=12 * 3600):
        """Record a delegated proxy for ``user_dn`` valid ``seconds`` from now."""
        with self.lock:
            self.delegations[user_dn] = time.time() + seconds

    def wait(self, job_id, timeout=10.0):
        """The job (a copy of its dict) once it reached a terminal state."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.jobs[job_id]["job_state"] not in JOB_TERMINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("job %s still %s after %ss" % (
                        job_id, self.jobs[job_id]["job_state"], timeout))
                self._wakeup.wait(min(left, 0.05))
            return dict(self.jobs[job_id])

    def find(self, method=None, path=None):
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method.upper())
                    and (path is None or r.path == path)]

    def count(self, method=None, path=None):
        return len(self.find(method, path))

    def files_of(self, job_id):
        with self.lock:
            return [_public(r) for r in self._files.values() if r["job_id"] == job_id]

    # ------------------------------------------------------------ jobs
    def _submit(self, user, doc):
        """Validate a submission as fts-rest's JobBuilder does; -> job_id."""
        if not isinstance(doc, dict):
            raise _HTTPError(400, "Expecting a dictionary")
        if doc.get("delete") is not None:
            raise _HTTPError(405, "Deletion jobs are no longer supported by FTS")
        files = doc.get("files")
        if files is None:
            raise _HTTPError(400, "No transfers operations specified")
        params = dict(DEFAULT_PARAMS)
        params.update(doc.get("params") or {})
        for k, v in list(params.items()):
            if v is None and k in DEFAULT_PARAMS:
                params[k] = DEFAULT_PARAMS[k]
        if params.get("multihop") or safe_int(params.get("bring_online")) > 0 \
                or safe_int(params.get("copy_pin_lifetime")) > 0:
            raise _HTTPError(400, "ctadata FTS stand-in: multihop and staging jobs are not "
                                  "emulated")
        job_id = str(uuid.uuid1())
        rows = []
        try:
            retry, retry_delay = int(params["retry"]), int(params["retry_delay"])
            priority = max(min(int(params["priority"]), 5), 1)
            if not isinstance(files, list):
                raise TypeError("files must be a list")
            for index, f in enumerate(files):
                sources, destinations = f["sources"], f["destinations"]
                if not isinstance(sources, list) or not isinstance(destinations, list):
                    raise TypeError("sources and destinations must be lists")
                if len(sources) > 1:
                    raise _HTTPError(400, "ctadata FTS stand-in: multiple replica jobs "
                                          "(several sources) are not emulated")
                src_tokens = f.get("source_tokens") or []
                dst_tokens = f.get("destination_tokens") or []
                if (src_tokens or dst_tokens) and not (src_tokens and dst_tokens):
                    raise _HTTPError(400, "Both source_tokens and destination_tokens are "
                                          "required if one of them is present.")
                if src_tokens and len(src_tokens) != len(sources):
                    raise _HTTPError(400, "Length of source_tokens should be equal to the "
                                          "length of sources.")
                if dst_tokens and len(dst_tokens) != len(destinations):
                    raise _HTTPError(400, "Length of destination_tokens should be equal to "
                                          "the length of destinations.")
                for si, source in enumerate(sources):
                    src = _validate_url(source)
                    for di, destination in enumerate(destinations):
                        dst = _validate_url(destination)
                        row = self._file_row(
                            job_id, index, src, dst, f, priority,
                            src_tokens[si] if src_tokens else user.get("token"),
                            dst_tokens[di] if dst_tokens else user.get("token"))
                        row["_src_given"] = row["_dst_given"] = bool(src_tokens)
                        rows.append(row)
        except KeyError as exc:
            raise _HTTPError(400, "Missing parameter: %s" % exc)
        except (ValueError, TypeError) as exc:
            raise _HTTPError(400, "Invalid value within the request: %s" % exc)
        if not rows:
            raise _HTTPError(400, "No valid pairs available")
        verify = params["verify_checksum"]
        has_checksum = any(r["checksum"] != "ADLER32" for r in rows)
        if isinstance(verify, bool):
            method = ("both" if verify else "target" if has_checksum else "none")
        else:
            method = str(verify) or "none"
        job = {
            "job_id": job_id, "job_state": "SUBMITTED", "job_type": "N",
            "source_se": rows[0]["source_se"], "dest_se": rows[0]["dest_se"],
            "cancel_job": False, "submit_host": self.submit_host,
            "user_dn": user["user_dn"], "cred_id": user["delegation_id"],
            "vo_name": self.vo, "voms_cred": "", "reason": None,
            "submit_time": _utc(), "priority": priority, "max_time_in_queue": None,
            "destination_spacetoken": params["destination_spacetoken"],
            "internal_job_params": None, "dst_file_report": bool(params["dst_file_report"]),
            "overwrite_flag": "Y" if params["overwrite"] else None, "job_finished": None,
            "source_spacetoken": params["source_spacetoken"],
            "copy_pin_lifetime": safe_int(params["copy_pin_lifetime"]),
            "verify_checksum": method[0], "bring_online": safe_int(params["bring_online"]),
            "archive_timeout": safe_int(params["archive_timeout"]), "target_qos": None,
            "job_metadata": _with_auth_method(params["job_metadata"], user["method"]),
            "retry": retry, "retry_delay": retry_delay, "os_project_id": None,
        }
        for r in rows:
            if r["source_se"] != job["source_se"]:
                job["source_se"] = None
            if r["dest_se"] != job["dest_se"]:
                job["dest_se"] = None
        with self.lock:
            self.jobs[job_id] = job
            for r in rows:
                r["file_id"] = self._next_file_id
                self._next_file_id += 1
                r["vo_name"] = self.vo
                self._files[r["file_id"]] = r
                self._retries[r["file_id"]] = []
                self._queue.append((0.0, r["file_id"]))
            self._wakeup.notify_all()
        return job_id

    def _file_row(self, job_id, index, src, dst, f, priority, src_token, dst_token):
        size = f.get("filesize")
        return {
            "file_id": None, "file_index": index, "job_id": job_id, "file_state": "SUBMITTED",
            "source_surl": src.geturl(), "dest_surl": dst.geturl(),
            "source_se": "%s://%s" % (src.scheme, src.hostname),
            "dest_se": "%s://%s" % (dst.scheme, dst.hostname),
            "priority": priority, "vo_name": None, "transfer_host": None, "reason": None,
            "recoverable": None, "filesize": None,
            "user_filesize": float(size) if size is not None else 0.0,
            "checksum": f.get("checksum") or "ADLER32",
            "file_metadata": f.get("metadata"), "staging_metadata": None,
            "archive_metadata": None, "activity": f.get("activity") or "default",
            "selection_strategy": f.get("selection_strategy", "auto"),
            "start_time": None, "finish_time": None, "tx_duration": None, "throughput": None,
            "retry": 0, "staging_start": None, "staging_finished": None,
            "bringonline_token": None, "dest_surl_uuid": None, "pid": None,
            "log_file": None, "hashed_id": 0, "file_state_initial": "",
            "_src_token": src_token, "_dst_token": dst_token,
        }

    def _job_json(self, job, file_fields=None):
        out = dict(job)
        if file_fields:
            out["files"] = [{k: r[k] for k in file_fields if k in r and not k.startswith("_")}
                            for r in self._files.values() if r["job_id"] == job["job_id"]]
        return out

    def _cancel_job(self, job, reason="Job canceled by the user"):
        now = _utc()
        job.update(job_state="CANCELED", cancel_job=True, job_finished=now, reason=reason)
        for r in self._files.values():
            if r["job_id"] == job["job_id"] and r["file_state"] in FILE_ACTIVE:
                r.update(file_state="CANCELED", reason=reason, finish_time=now)
        self._wakeup.notify_all()

    def _update_job(self, job_id):
        """Job state from its files, as the FTS3 server decides it."""
        job = self.jobs[job_id]
        if job["job_state"] in JOB_TERMINAL:
            return
        states = [r["file_state"] for r in self._files.values() if r["job_id"] == job_id]
        if any(s in ("ACTIVE", "READY") for s in states) and job["job_state"] == "SUBMITTED":
            job["job_state"] = "ACTIVE"
        finished = states.count("FINISHED")
        failed = states.count("FAILED")
        canceled = states.count("CANCELED")
        if finished + failed + canceled < len(states):
            return
        reason = FAILED_JOB_REASON
        if finished and failed:
            state = "FINISHEDDIRTY"
        elif finished == len(states):
            state, reason = "FINISHED", None
        elif failed:
            state = "FAILED"
        else:
            state = "CANCELED"
        job.update(job_state=state, reason=reason, job_finished=_utc())
        self._wakeup.notify_all()

    # ------------------------------------------------------------ copy workers
    def _worker(self):
        while not self._stopping.is_set():
            with self.lock:
                item = self._take()
                if item is None:
                    self._wakeup.wait(0.05)
                    continue
                row = item
                row.update(file_state="ACTIVE", start_time=_utc(), finish_time=None,
                           transfer_host=self.submit_host, reason=None)
                self._update_job(row["job_id"])
                job = dict(self.jobs[row["job_id"]])
                outcome = next((o for o in self.outcomes if o.matches(row)), None)
                if outcome is not None:
                    outcome.hits += 1
            began = time.monotonic()
            result, reason, recoverable, size = "FINISHED", None, None, None
            try:
                size = self._attempt(row, job, outcome)
            except _Canceled:
                result = "CANCELED"
            except _CopyFailed as exc:
                result, reason, recoverable = "FAILED", exc.reason, exc.recoverable
            except Exception as exc:  # a bug in the stand-in: fail the file, keep the trace
                with self.lock:
                    self.errors.append(traceback.format_exc())
                result, reason, recoverable = "FAILED", "stand-in error: %r" % exc, False
            self._settle(row, job, result, reason, recoverable, size, time.monotonic() - began)

    def _take(self):
        """The next file ready to go (first come, first served), or None."""
        now = time.monotonic()
        for item in list(self._queue):
            row = self._files[item[1]]
            if row["file_state"] != "SUBMITTED":
                self._queue.remove(item)            # canceled while queued
            elif item[0] <= now:
                self._queue.remove(item)
                return row
        return None

    def _settle(self, row, job, result, reason, recoverable, size, duration):
        with self.lock:
            self.transfers.append({"file_id": row["file_id"], "source": row["source_surl"],
                                   "destination": row["dest_surl"], "outcome": result,
                                   "reason": reason})
            if row["file_state"] != "ACTIVE":       # canceled meanwhile
                self._update_job(row["job_id"])
                return
            now = _utc()
            if result == "FAILED" and recoverable and row["retry"] < job["retry"]:
                row["retry"] += 1
                self._retries[row["file_id"]].append({
                    "attempt": row["retry"], "datetime": now, "reason": reason,
                    "transfer_host": self.submit_host, "log_file": None})
                row.update(file_state="SUBMITTED", reason=reason)
                self._queue.append((time.monotonic() + job["retry_delay"], row["file_id"]))
            else:
                row.update(file_state=result, reason=reason, finish_time=now,
                           tx_duration=round(duration, 3), recoverable=recoverable)
                if size is not None:
                    row["filesize"] = size
                    row["throughput"] = round(size / max(duration, 1e-6) / 1e6, 3)
            self._update_job(row["job_id"])
            self._wakeup.notify_all()

    def _check_canceled(self, row):
        with self.lock:
            if row["file_state"] != "ACTIVE" or self._stopping.is_set():
                raise _Canceled()

    def _attempt(self, row, job, outcome):
        if outcome is not None and outcome.delay:
            deadline = time.monotonic() + outcome.delay
            while time.monotonic() < deadline:
                self._check_canceled(row)
                self._stopping.wait(min(0.02, max(0, deadline - time.monotonic())))
        self._check_canceled(row)
        if outcome is not None and outcome.fail:
            raise _CopyFailed(outcome.fail, outcome.recoverable)
        return _Copy(self, row, job).run()


class _Copy(object):
    """One streamed copy source -> stand-in -> destination (gfal2 without TPC)."""

    def __init__(self, fts, row, job):
        self.fts, self.row, self.job = fts, row, job

    def run(self):
        row, job = self.row, self.job
        src, dst = row["source_surl"], row["dest_surl"]
        src_token, dst_token = self._token(src, row["_src_token"], row["_src_given"]), \
            self._token(dst, row["_dst_token"], row["_dst_given"])
        head = self._request("HEAD", dst, dst_token)
        if head.status == 200:
            if job["overwrite_flag"] != "Y":
                raise _CopyFailed("DESTINATION OVERWRITE Destination file exists and "
                                  "overwrite is not enabled", recoverable=False)
            self._expect(self._request("DELETE", dst, dst_token), (200, 204, 404),
                         "DESTINATION", "DELETE")
        with tempfile.TemporaryFile() as spool:
            resp = self._request("GET", src, src_token, {"Want-Digest": "adler32"}, stream=True)
            self._expect(resp, (200,), "SOURCE", "GET", recoverable=resp.status != 404)
            src_sum = _digest_adler32(resp.getheader("Digest"))
            adler, size = 1, 0
            try:
                while True:
                    data = resp.read(BUFSIZE)
                    if not data:
                        break
                    adler = zlib.adler32(data, adler)
                    size += len(data)
                    spool.write(data)
                    self.fts._check_canceled(row)
            finally:
                resp.conn.close()
            length = resp.getheader("Content-Length")
            if length is not None and int(length) != size:
                raise _CopyFailed("SOURCE TRANSFER read %d of %s bytes" % (size, length))
            read_sum = "%08x" % (adler & 0xFFFFFFFF)
            if row["user_filesize"] and int(row["user_filesize"]) != size:
                raise _CopyFailed("SOURCE User specified source file size is %d but stat "
                                  "returned %d" % (int(row["user_filesize"]), size),
                                  recoverable=False)
            self._verify_source(src_sum or read_sum, read_sum)
            self._put(dst, dst_token, spool, size)
        self._verify_destination(dst, dst_token, src_sum or read_sum)
        with self.fts.lock:
            if row["checksum"] == "ADLER32" or row["checksum"].lower().startswith("adler32"):
                row["checksum"] = "adler32:" + (src_sum or read_sum)
        return size

    # ---- checksums (FTS3 url-copy semantics of verify_checksum) -----------
    def _user_sum(self):
        value = self.row["checksum"]
        if value == "ADLER32":
            return None
        algo, _, hexsum = value.partition(":")
        if algo.lower() != "adler32":
            raise _CopyFailed("ctadata FTS stand-in: only adler32 checksums are emulated "
                              "(got %s)" % algo, recoverable=False)
        return hexsum.lower().rjust(8, "0")

    def _verify_source(self, src_sum, read_sum):
        mode = self.job["verify_checksum"]
        if src_sum != read_sum:
            raise _CopyFailed("SOURCE CHECKSUM MISMATCH Source checksum %s differs from the "
                              "checksum of the data read %s" % (src_sum, read_sum))
        user = self._user_sum()
        if mode in ("b", "s") and user is not None and user != src_sum:
            raise _CopyFailed("SOURCE CHECKSUM MISMATCH User defined checksum and source "
                              "checksum do not match %s != %s" % (user, src_sum),
                              recoverable=False)

    def _verify_destination(self, dst, token, src_sum):
        mode = self.job["verify_checksum"]
        if mode == "n":
            return
        user = self._user_sum()
        if mode == "s" or (mode == "t" and user is None):
            return
        dst_sum = self._destination_sum(dst, token)
        expected = src_sum if mode in ("b", "d") else user
        if dst_sum != expected:
            self._request("DELETE", dst, token)
            what = "Source and destination" if mode in ("b", "d") else \
                "User defined and destination"
            raise _CopyFailed("DESTINATION CHECKSUM MISMATCH %s checksums do not match "
                              "%s != %s" % (what, expected, dst_sum))

    def _destination_sum(self, dst, token):
        head = self._request("HEAD", dst, token, {"Want-Digest": "adler32"})
        value = _digest_adler32(head.getheader("Digest"))
        if value is not None:
            return value
        resp = self._request("GET", dst, token, stream=True)
        self._expect(resp, (200,), "DESTINATION", "GET")
        adler = 1
        try:
            for data in iter(lambda: resp.read(BUFSIZE), b""):
                adler = zlib.adler32(data, adler)
        finally:
            resp.conn.close()
        return "%08x" % (adler & 0xFFFFFFFF)

    # ---- HTTP -------------------------------------------------------------
    def _token(self, url, token, from_file):
        if from_file:
            return token
        parts = urlsplit(url)
        scheme = _SCHEMES.get(parts.scheme, parts.scheme)
        origin = "%s://%s:%s" % (scheme, parts.hostname,
                                 parts.port or (443 if scheme == "https" else 80))
        return self.fts.storage_tokens.get(origin, token)

    def _put(self, dst, token, spool, size):
        for attempt in (1, 2):
            spool.seek(0)
            resp = self._request("PUT", dst, token, {"Content-Length": str(size)}, body=spool)
            if resp.status == 409 and attempt == 1:
                self._mkcol_parents(dst, token)
                continue
            self._expect(resp, (200, 201, 204), "DESTINATION", "PUT")
            return

    def _mkcol_parents(self, dst, token):
        parts = urlsplit(dst)
        segments = parts.path.split("/")[1:-1]
        for i in range(1, len(segments) + 1):
            url = "%s://%s/%s/" % (parts.scheme, parts.netloc, "/".join(segments[:i]))
            self._request("MKCOL", url, token)

    def _expect(self, resp, ok, side, method, recoverable=True):
        if resp.status not in ok:
            raise _CopyFailed("%s [%d] %s failed with HTTP %d %s" % (
                side, 2 if resp.status == 404 else 5, method, resp.status, resp.reason),
                recoverable=recoverable)

    def _request(self, method, url, token, headers=None, body=None, stream=False):
        """One request, following redirects; the response is read unless ``stream``."""
        origin = None
        for _ in range(6):
            parts = urlsplit(url)
            scheme = _SCHEMES.get(parts.scheme)
            if scheme is None:
                raise _CopyFailed("ctadata FTS stand-in: protocol %s is not emulated"
                                  % parts.scheme, recoverable=False)
            if not _is_loopback(parts.hostname):
                raise _CopyFailed("ctadata FTS stand-in: only loopback hosts are contacted "
                                  "(%s)" % parts.hostname, recoverable=False)
            here = (scheme, parts.hostname, parts.port)
            origin = origin or here
            hdrs = dict(headers or {})
            if token and here == origin:
                hdrs["Authorization"] = "Bearer " + token
            if scheme == "https":
                ctx = ssl.create_default_context(cafile=self.fts.storage_ca)
                conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30,
                                                   context=ctx)
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            target = quote(unquote(parts.path), safe="/") + ("?" + parts.query
                                                             if parts.query else "")
            try:
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise _CopyFailed("%s %s: %s" % (method, url, exc))
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                conn.close()
                url = resp.getheader("Location")
                if not urlsplit(url).scheme:
                    url = "%s://%s%s" % (parts.scheme, parts.netloc, url)
                if body is not None and hasattr(body, "seek"):
                    body.seek(0)
                continue
            resp.conn = conn
            if not stream:
                resp.read()
                conn.close()
            return resp
        raise _CopyFailed("%s %s: too many redirects" % (method, url))


# ---------------------------------------------------------------- helpers

def safe_int(value, default=-1):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _validate_url(text):
    if not isinstance(text, str):
        raise TypeError("URLs must be strings")
    url = urlsplit(text.strip())
    if not url.scheme:
        raise ValueError("Missing scheme (%s)" % url.geturl())
    if url.scheme == "file":
        raise ValueError("Can not transfer local files (%s)" % url.geturl())
    if not url.path or (url.path == "/" and not url.query):
        raise ValueError("Missing path (%s)" % url.geturl())
    if not url.hostname:
        raise ValueError("Missing host (%s)" % url.geturl())
    return url


def _with_auth_method(metadata, method):
    if isinstance(metadata, dict):
        out = dict(metadata)
        out["auth_method"] = method
        return out
    return {"auth_method": method}


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _digest_adler32(header):
    for item in (header or "").split(","):
        name, _, value = item.strip().partition("=")
        if name.lower() == "adler32" and value:
            return value.strip().lower().rjust(8, "0")
    return None


def _public(row):
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _dn(cert):
    parts = []
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            parts.append("%s=%s" % (_DN_NAMES.get(name, name), value))
    return "/" + "/".join(parts)


# ---------------------------------------------------------------- handler

class _Handler(DoubleHandler):
    server_version = "fts3-rest-stand-in/3"

    def setup(self):
        ctx = self.server.double._server_ctx
        self._tls_failed = False
        if ctx is not None:
            try:
                self.request = ctx.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                self._tls_failed = True
        DoubleHandler.setup(self)

    def handle(self):
        if not self._tls_failed:
            DoubleHandler.handle(self)

    def handle_one_request(self):
        self._record = None
        DoubleHandler.handle_one_request(self)

    def send_response(self, code, message=None):
        DoubleHandler.send_response(self, code, message)
        if self._record is not None and code >= 200:
            self._record.status = code

    def _error(self, status, message):
        self.send_json(status, {"status": "%d %s" % (status, _REASONS.get(status, "")),
                                "message": message})

    def _dispatch(self):
        fts = self.double
        split = urlsplit(self.path)
        path = unquote(split.path).rstrip("/") or "/"
        headers = {}
        for name, value in self.headers.items():
            if name.lower() == "authorization":
                value = value.partition(" ")[0] + " <redacted>"
            headers[name.lower()] = value
        user, problem = self._authenticate()
        record = Record("fts", self.command, path, split.query, headers, user is not None,
                        time.time())
        with fts.lock:
            fts.requests.append(record)
        self._record = record
        if self.has_body():
            record.body = self.read_body()
        if problem is not None:
            return self._error(*problem)
        try:
            self._route(user, path, split.query, record)
        except Exception:
            with fts.lock:
                fts.errors.append(traceback.format_exc())
            self.close_connection = True
            if record.status is None:
                self._error(500, "stand-in error (see fts.errors)")

    def _route(self, user, path, query, record):
        fts = self.double
        self.user = user
        self.query = parse_qs(query)
        parts = path.strip("/").split("/")
        try:
            if parts == ["whoami"] and self.command == "GET":
                return self._whoami()
            if len(parts) == 2 and parts[0] == "delegation" and self.command == "GET":
                with fts.lock:
                    return self._delegation(parts[1])
            if parts[0] != "jobs":
                raise _HTTPError(404, "The resource could not be found")
            with fts.lock:
                return self._jobs(parts[1:], record.body)
        except _HTTPError as exc:
            return self._error(exc.status, exc.message)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _dispatch

    def _authenticate(self):
        """(user dict, None) or (None, (status, message))."""
        fts = self.double
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
            subject = fts.tokens.get(token)
            if subject is None:
                return None, (403, "Invalid credentials (unknown or invalid token)")
            return self._user(subject, "oauth2", token=token), None
        cert = self.request.getpeercert() if hasattr(self.request, "getpeercert") else None
        if cert:
            return self._user(_dn(cert), "certificate"), None
        return None, (401, "A valid X509 certificate or proxy is needed")

    def _user(self, user_dn, method, token=None):
        vo = self.double.vo
        return {"user_dn": user_dn, "dn": [user_dn], "vos": [vo], "voms_cred": [],
                "vos_id": [str(uuid.uuid5(uuid.NAMESPACE_DNS, vo))], "roles": [],
                "level": {"transfer": "all"}, "is_root": False, "method": method,
                "base_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "fts3")),
                "delegation_id": hashlib.sha1(user_dn.encode()).hexdigest()[:16],
                "token": token}

    def _whoami(self):
        self.send_json(200, {k: v for k, v in self.user.items() if k != "token"})

    def _own_job(self, job_id):
        job = self.double.jobs.get(job_id)
        if job is None:
            raise _HTTPError(404, 'No job with the id "%s" has been found' % job_id)
        if job["user_dn"] != self.user["user_dn"]:
            raise _HTTPError(403, 'Not enough permissions to check the job "%s"' % job_id)
        return job

    def _jobs(self, rest, body):
        fts, cmd = self.double, self.command
        if not rest:
            if cmd in ("POST", "PUT"):
                return self._submit(body)
            if cmd == "GET":
                states = self.query.get("state_in", [""])[0].split(",")
                jobs = [j for j in fts.jobs.values() if j["user_dn"] == self.user["user_dn"]
                        and ((states != [""] and j["job_state"] in states)
                             or (states == [""] and j["job_finished"] is None))]
                return self.send_json(200, jobs)
            raise _HTTPError(405, "The method is not allowed for the requested URL.")
        ids = [i for i in rest[0].split(",") if i]
        if len(rest) == 1 and cmd == "GET":
            return self._multi(ids, self._get_one)
        if len(rest) == 1 and cmd == "DELETE":
            return self._multi(ids, self._cancel_one)
        if len(rest) == 2 and rest[1] == "files" and cmd == "GET":
            self._own_job(rest[0])
            return self.send_json(200, fts.files_of(rest[0]))
        if len(rest) == 3 and rest[1] == "files" and cmd == "DELETE":
            return self._cancel_files(self._own_job(rest[0]), rest[2])
        if len(rest) == 4 and rest[1] == "files" and rest[3] == "retries" and cmd == "GET":
            self._own_job(rest[0])
            row = fts._files.get(safe_int(rest[2]))
            if row is None or row["job_id"] != rest[0]:
                raise _HTTPError(404, "No file with the id %s in the job" % rest[2])
            return self.send_json(200, fts._retries[row["file_id"]])
        raise _HTTPError(404, "The resource could not be found")

    def _submit(self, body):
        fts = self.double
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            raise _HTTPError(400, "Expecting application/json or "
                                  "application/x-www-form-urlencoded")
        try:
            doc = json.loads((body or b"").decode("utf-8"))
        except ValueError:
            raise _HTTPError(400, "Badly formatted JSON request")
        if self.user["method"] == "certificate" and fts.require_delegation:
            self._check_delegation()
        job_id = fts._submit(self.user, doc)
        self.send_json(200, {"job_id": job_id})

    def _check_delegation(self):
        """fts-rest's checks of the delegated credential of a certificate user."""
        user = self.user
        expiry = self.double.delegations.get(user["user_dn"])
        if expiry is None:
            raise _HTTPError(419, 'No delegation found for "%s"' % user["user_dn"])
        left = expiry - time.time()
        if left <= 0:
            raise _HTTPError(419, "The delegated credentials expired %d seconds ago (%s)"
                             % (-left, user["delegation_id"]))
        if left < 3600:
            raise _HTTPError(419, "The delegated credentials has less than one hour left "
                                  "(%s)" % user["delegation_id"])

    def _delegation(self, dlg_id):
        if dlg_id != self.user["delegation_id"]:
            raise _HTTPError(403, "The requested ID and the credentials ID do not match")
        expiry = self.double.delegations.get(self.user["user_dn"])
        if expiry is None:
            return self.send_json(200, None)
        self.send_json(200, {"termination_time": _utc(expiry), "voms_attrs": [""]})

    def _get_one(self, job_id):
        job = self._own_job(job_id)
        fields = self.query.get("files", [""])[0].split(",")
        out = self.double._job_json(job, [f for f in fields if f])
        out["http_status"] = "200 Ok"
        return out

    def _cancel_one(self, job_id):
        job = self._own_job(job_id)
        if job["job_state"] in JOB_ACTIVE:
            self.double._cancel_job(job)
            out = dict(job)
            out.update(http_status="200 Ok", http_message=None)
        else:
            out = dict(job)
            out.update(http_status="304 Not Modified",
                       http_message="The job is in a terminal state")
        return out

    def _multi(self, ids, one):
        outs, errors = [], 0
        for job_id in ids:
            try:
                outs.append(one(job_id))
            except _HTTPError as exc:
                errors += 1
                outs.append({"job_id": job_id, "http_status": "%d %s" % (
                    exc.status, _REASONS.get(exc.status, "")), "http_message": exc.message})
        if len(ids) == 1:
            status = int(outs[0]["http_status"].split()[0]) if errors else 200
            return self.send_json(status, outs[0])
        return self.send_json(207 if errors else 200, outs)

    def _cancel_files(self, job, file_ids):
        fts = self.double
        changed = []
        for fid in file_ids.split(","):
            row = fts._files.get(safe_int(fid))
            if row is None or row["job_id"] != job["job_id"]:
                changed.append("File does not belong to the job")
            elif row["file_state"] not in FILE_ACTIVE:
                changed.append(row["file_state"])
            else:
                row.update(file_state="CANCELED", finish_time=_utc(),
                           reason="File canceled by the user")
                changed.append("CANCELED")
        fts._update_job(job["job_id"])
        fts._wakeup.notify_all()
        self.send_json(200, changed if len(changed) > 1 else changed[0])


FTSServer.handler_class = _Handler
