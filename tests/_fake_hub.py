""" A Hugging Face Hub-compatible HTTP server on 127.0.0.1 for tests (standard library only).

Speaks the routes huggingface_hub 2.x and timm use for model repos: repo create, YAML validation, preupload,
LFS batch + PUT (basic transfer), NDJSON commit, branch create, resolve (HEAD/GET with commit/etag headers),
model info, revision info and tree listing. Clients must run with `HF_HUB_DISABLE_XET=1` (no Xet routes here).

Fault injection for error-path tests:
  * `hub.fail_next(method, path_part, status, count=1, headers=None)`: the next `count` matching requests answer
    `status` (with `headers`, e.g. {'Retry-After': '7'});
  * `hub.hang_next(method, path_part, count=1)`: the next `count` matching requests are read and never answered
    (a Hub or proxy that accepts the connection and hangs) until the hub is reset or stopped;
  * `hub.truncate = {'model.safetensors'}`: GET of that file sends only the first half of its bytes
    (a consistent but short response, as from a broken proxy), HEAD still reports the full size;
  * `hub.tokens = {'hf_x'}`: writes without `Authorization: Bearer <one of tokens>` answer 401.
`hub.requests` records `(method, path, status)` for every request served.
"""
import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple

_LFS_SUFFIXES = ('.safetensors', '.bin', '.png', '.pth', '.pt')


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _File:
    def __init__(self, data: bytes, lfs: bool):
        self.data = data
        self.lfs = lfs
        self.sha1 = _git_blob_sha1(data)
        self.sha256 = hashlib.sha256(data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.sha1


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.commits: Dict[str, Dict[str, _File]] = {}
        self.refs: Dict[str, str] = {}
        self.prs = 0
        self.commit('main', {'.gitattributes': _File(b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n', False)},
                    'initial commit', parent=None)

    def commit(self, ref: str, files: Dict[str, _File], message: str, parent: Optional[str]) -> str:
        sha = hashlib.sha1(f'{self.repo_id}{ref}{message}{len(self.commits)}{parent}'.encode()).hexdigest()
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> Optional[str]:
        rev = urllib.parse.unquote(rev)
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class FakeHub:
    """The server state plus the thread serving it; use as a context manager."""

    def __init__(self):
        self.repos: Dict[str, _Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.tokens: Optional[Set[str]] = None
        self.truncate: Set[str] = set()
        self.requests: List[Tuple[str, str, int]] = []
        self._faults: List[list] = []
        self._hangs: List[list] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> 'FakeHub':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, method: str, path_part: str, status: int, count: int = 1,
                  headers: Optional[Dict[str, str]] = None) -> None:
        with self._lock:
            self._faults.append([method.upper(), path_part, status, count, dict(headers or {})])

    def hang_next(self, method: str, path_part: str, count: int = 1) -> None:
        with self._lock:
            self._hangs.append([method.upper(), path_part, count])

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.lfs_objects.clear()
            self._faults.clear()
            self._hangs.clear()
            self._release.set()
            self._release = threading.Event()
            self.requests.clear()
            self.tokens = None
            self.truncate = set()

    def files(self, repo_id: str, rev: str = 'main') -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: f.data for p, f in repo.commits[repo.resolve(rev)].items()}

    def _take_fault(self, method: str, path: str) -> Optional[Tuple[int, Dict[str, str]]]:
        with self._lock:
            for fault in self._faults:
                if fault[0] == method and fault[1] in path and fault[3] > 0:
                    fault[3] -= 1
                    return fault[2], fault[4]
        return None

    def _take_hang(self, method: str, path: str) -> Optional[threading.Event]:
        with self._lock:
            for hang in self._hangs:
                if hang[0] == method and hang[1] in path and hang[2] > 0:
                    hang[2] -= 1
                    return self._release
        return None


def _make_handler(hub: FakeHub):

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args):  # keep test output clean
            pass

        # ---- plumbing
        def _body(self) -> bytes:
            n = int(self.headers.get('Content-Length') or 0)
            return self.rfile.read(n) if n else b''

        def _send(self, status: int, payload=None, headers: Optional[dict] = None, raw: Optional[bytes] = None,
                  length: Optional[int] = None):
            body = raw if raw is not None else (b'' if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            if raw is None:
                self.send_header('Content-Type', 'application/json')
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header('Content-Length', str(len(body) if length is None else length))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)
            hub.requests.append((self.command, self.path, status))

        def _error(self, status: int, message: str, code: Optional[str] = None, commit: Optional[str] = None,
                   extra: Optional[Dict[str, str]] = None):
            headers = {'X-Error-Message': message, **(extra or {})}
            if code:
                headers['X-Error-Code'] = code
            if commit:
                headers['X-Repo-Commit'] = commit
            self._send(status, {'error': message}, headers)

        def _authorized(self) -> bool:
            if hub.tokens is None:
                return True
            auth = self.headers.get('Authorization', '')
            return auth.startswith('Bearer ') and auth[len('Bearer '):] in hub.tokens

        def _dispatch(self):
            parsed = urllib.parse.urlsplit(self.path)
            path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
            release = hub._take_hang(self.command, path)
            if release is not None:
                self._body()
                hub.requests.append((self.command, self.path, 0))  # 0: never answered
                release.wait(60)
                self.close_connection = True
                return
            fault = hub._take_fault(self.command, path)
            if fault is not None:
                self._body()
                return self._error(fault[0], f'injected error {fault[0]}', extra=fault[1])
            body = self._body() if self.command in ('POST', 'PUT') else b''
            if self.command in ('POST', 'PUT') and not self._authorized():
                return self._error(401, 'Invalid credentials in Authorization header')
            for method, pattern, fn in _ROUTES:
                if method == self.command:
                    m = re.fullmatch(pattern, path)
                    if m:
                        return fn(self, m, query, body)
            self._error(404, f'no route {self.command} {path}')

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        # ---- repo lookup
        def _repo(self, repo_id: str) -> Optional[_Repo]:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f'Repository Not Found for url: {self.path}.', 'RepoNotFound')
            return repo

        def _rev(self, repo: _Repo, rev: str) -> Optional[str]:
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
            return sha

        def _repo_rev(self, repo_id: str, rev: str) -> Tuple[Optional[_Repo], Optional[str]]:
            """(repo, commit sha) or, after sending the 404, (None, None)."""
            repo = self._repo(repo_id)
            sha = self._rev(repo, rev) if repo is not None else None
            return (repo, sha) if sha is not None else (None, None)

        # ---- routes
        def create_repo(self, m, q, body):
            data = json.loads(body or b'{}')
            repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
            url = {'url': f'{hub.url}/{repo_id}', 'name': repo_id, 'id': repo_id}
            if repo_id in hub.repos:
                return self._send(409, dict(url, error='You already created this model repo'))
            hub.repos[repo_id] = _Repo(repo_id, data.get('visibility') == 'private' or bool(data.get('private')))
            self._send(200, url)

        def validate_yaml(self, m, q, body):
            self._send(200, {'errors': [], 'warnings': []})

        def preupload(self, m, q, body):
            repo = self._repo(m['repo'])
            if repo is None:
                return
            files = json.loads(body)['files']
            self._send(200, {'files': [
                {'path': f['path'], 'uploadMode': 'lfs' if f['path'].endswith(_LFS_SUFFIXES) else 'regular',
                 'shouldIgnore': False} for f in files]})

        def lfs_batch(self, m, q, body):
            if self._repo(m['repo']) is None:
                return
            objects = []
            for obj in json.loads(body)['objects']:
                entry = {'oid': obj['oid'], 'size': obj['size']}
                if obj['oid'] not in hub.lfs_objects:
                    entry['actions'] = {'upload': {'href': f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._send(200, {'transfer': 'basic', 'objects': objects})

        def lfs_put(self, m, q, body):
            if hashlib.sha256(body).hexdigest() != m['oid']:
                return self._error(400, 'sha256 mismatch')
            hub.lfs_objects[m['oid']] = body
            self._send(200, {})

        def commit(self, m, q, body):
            repo = self._repo(m['repo'])
            if repo is None:
                return
            rev = urllib.parse.unquote(m['rev'])
            parent = self._rev(repo, rev)
            if parent is None:
                return
            files = dict(repo.commits[parent])
            message = ''
            for line in body.decode().splitlines():
                item = json.loads(line)
                key, value = item['key'], item['value']
                if key == 'header':
                    message = value['summary']
                elif key == 'file':
                    files[value['path']] = _File(base64.b64decode(value['content']), False)
                elif key == 'lfsFile':
                    if value['oid'] not in hub.lfs_objects:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    files[value['path']] = _File(hub.lfs_objects[value['oid']], True)
                elif key in ('deletedFile', 'deletedFolder'):
                    files = {p: f for p, f in files.items() if not p.startswith(value['path'])}
            reply = {}
            if q.get('create_pr') == ['1']:
                repo.prs += 1
                ref = f'refs/pr/{repo.prs}'
                reply['pullRequestUrl'] = f'{hub.url}/{repo.repo_id}/discussions/{repo.prs}'
            else:
                ref = rev
            sha = repo.commit(ref, files, message, parent)
            reply.update(commitOid=sha, commitUrl=f'{hub.url}/{repo.repo_id}/commit/{sha}', success=True)
            self._send(200, reply)

        def create_branch(self, m, q, body):
            repo = self._repo(m['repo'])
            if repo is None:
                return
            branch = urllib.parse.unquote(m['branch'])
            if branch in repo.refs:
                return self._error(409, f'Reference already exists: {branch}')
            start = json.loads(body or b'{}').get('startingPoint') or 'main'
            repo.refs[branch] = repo.resolve(start)
            self._send(200, {})

        def resolve(self, m, q, body):
            repo, sha = self._repo_rev(m['repo'], m['rev'])
            if sha is None:
                return
            path = urllib.parse.unquote(m['path'])
            f = repo.commits[sha].get(path)
            if f is None:
                return self._error(404, f'Entry not found: {path}', 'EntryNotFound', commit=sha)
            headers = {'X-Repo-Commit': sha, 'ETag': f'"{f.sha1}"', 'Content-Type': 'application/octet-stream'}
            if f.lfs:
                headers.update({'X-Linked-Etag': f'"{f.sha256}"', 'X-Linked-Size': len(f.data)})
            data = f.data
            if self.command == 'GET' and path in hub.truncate:
                data = data[:len(data) // 2]
            rng = self.headers.get('Range')
            if self.command == 'GET' and rng:
                start = int(re.match(r'bytes=(\d+)-', rng).group(1))
                return self._send(206, raw=data[start:], headers=headers)
            self._send(200, raw=data, headers=headers, length=len(f.data) if self.command == 'HEAD' else None)

        def model_info(self, m, q, body):
            repo, sha = self._repo_rev(m['repo'], m['rev'] or 'main')
            if sha is None:
                return
            self._send(200, {'id': repo.repo_id, 'modelId': repo.repo_id, 'sha': sha, 'private': repo.private,
                             'siblings': [{'rfilename': p} for p in sorted(repo.commits[sha])]})

        def tree(self, m, q, body):
            repo, sha = self._repo_rev(m['repo'], m['rev'])
            if sha is None:
                return
            entries = []
            for p, f in sorted(repo.commits[sha].items()):
                entry = {'type': 'file', 'path': p, 'size': len(f.data), 'oid': f.sha1}
                if f.lfs:
                    entry['lfs'] = {'oid': f.sha256, 'size': len(f.data), 'pointerSize': 134}
                entries.append(entry)
            self._send(200, entries)

    return Handler


_REPO = r'(?P<repo>[^/]+/[^/]+?)'
_ROUTES = [
    ('POST', r'/api/repos/create', lambda h, *a: h.create_repo(*a)),
    ('POST', r'/api/validate-yaml', lambda h, *a: h.validate_yaml(*a)),
    ('POST', rf'/api/models/{_REPO}/preupload/(?P<rev>.+)', lambda h, *a: h.preupload(*a)),
    ('POST', rf'/{_REPO}\.git/info/lfs/objects/batch', lambda h, *a: h.lfs_batch(*a)),
    ('PUT', r'/lfs-upload/(?P<oid>[0-9a-f]{64})', lambda h, *a: h.lfs_put(*a)),
    ('POST', rf'/api/models/{_REPO}/commit/(?P<rev>.+)', lambda h, *a: h.commit(*a)),
    ('POST', rf'/api/models/{_REPO}/branch/(?P<branch>.+)', lambda h, *a: h.create_branch(*a)),
    ('HEAD', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)', lambda h, *a: h.resolve(*a)),
    ('GET', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)', lambda h, *a: h.resolve(*a)),
    ('GET', rf'/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/.*)?', lambda h, *a: h.tree(*a)),
    ('GET', rf'/api/models/{_REPO}/revision/(?P<rev>.+)', lambda h, *a: h.model_info(*a)),
    ('GET', rf'/api/models/{_REPO}(?P<rev>)', lambda h, *a: h.model_info(*a)),
]


def serve_forever() -> None:  # pragma: no cover - manual debugging helper
    with FakeHub() as hub:
        print(hub.url, flush=True)
        threading.Event().wait()


if __name__ == '__main__':  # pragma: no cover
    serve_forever()
