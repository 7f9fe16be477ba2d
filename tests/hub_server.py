"""A minimal Hugging Face Hub on 127.0.0.1, so huggingface_hub's real client code runs in tests, offline.

Serves what `hf_hub_download` (HEAD + GET of `/{repo_id}/resolve/{revision}/{filename}`) and timm's
`push_to_hf_hub` (`/api/repos/create`, `/api/validate-yaml`, `/api/models/{repo_id}/preupload/{rev}`,
`/api/models/{repo_id}/commit/{rev}`) need, plus the empty `/api/agent-harnesses` registry huggingface_hub asks
for. Simplification, on purpose: preupload answers "regular" for
every file, so file contents arrive base64-encoded in the ndjson commit; the LFS / Xet blob transports
the real Hub uses for large files are not emulated. Anything else is answered 501 and recorded, so a test
sees when the client starts needing an endpoint this server lacks.
"""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit


class LocalHub:
    """Repositories held in memory: repo_id -> {'refs': {branch: oid}, 'commits': {oid: {path: bytes}}}."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, dict]] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []  # (method, path, authorization)
        self.unhandled: List[Tuple[str, str]] = []
        self.commit_messages: List[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def __enter__(self) -> 'LocalHub':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def create_repo(self, repo_id: str) -> bool:
        """Create an empty repo with a `main` branch; False when it already exists."""
        with self._lock:
            if repo_id in self.repos:
                return False
            oid = _commit_oid(repo_id, {}, '')
            self.repos[repo_id] = {'refs': {'main': oid}, 'commits': {oid: {}}}
            return True

    def commit(self, repo_id: str, revision: str, files: Dict[str, bytes], message: str = 'upload') -> str:
        """Add files on top of `revision` and move the branch; returns the new commit oid."""
        with self._lock:
            repo = self.repos[repo_id]
            tree = dict(repo['commits'][repo['refs'][revision]], **files)
            oid = _commit_oid(repo_id, tree, message + repo['refs'][revision])
            repo['commits'][oid] = tree
            repo['refs'][revision] = oid
            self.commit_messages.append(message)
            return oid

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """The tree of a branch or commit."""
        repo = self.repos[repo_id]
        return repo['commits'][repo['refs'].get(revision, revision)]

    def resolve(self, repo_id: str, revision: str) -> Optional[str]:
        """Commit oid of a branch name or an oid; None when unknown."""
        repo = self.repos[repo_id]
        if revision in repo['refs']:
            return repo['refs'][revision]
        return revision if revision in repo['commits'] else None


def _commit_oid(repo_id: str, tree: Dict[str, bytes], salt: str) -> str:
    digest = hashlib.sha1(repo_id.encode() + salt.encode())
    for path in sorted(tree):
        digest.update(path.encode() + hashlib.sha1(tree[path]).digest())
    return digest.hexdigest()


def _make_handler(hub: LocalHub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _record(self) -> str:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get('Authorization')))
            return path

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get('Content-Length', 0)))

        def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                  content_type: str = 'application/json') -> None:
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def _json(self, status: int, obj: object, headers: Optional[Dict[str, str]] = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
            headers = dict(headers or {}, **{'X-Error-Code': code, 'X-Error-Message': message})
            self._json(status, {'error': message}, headers)

        def _unhandled(self, path: str) -> None:
            hub.unhandled.append((self.command, path))
            self._error(501, 'NotImplemented', f'{self.command} {path} is not emulated by tests/hub_server.py')

        def _resolve_file(self, path: str) -> None:
            # /{org}/{name}/resolve/{revision}/{filename...}
            parts = path.lstrip('/').split('/')
            if len(parts) < 5 or parts[2] != 'resolve':
                return self._unhandled(path)
            repo_id, revision, filename = '/'.join(parts[:2]), unquote(parts[3]), unquote('/'.join(parts[4:]))
            if repo_id not in hub.repos:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
            commit = hub.resolve(repo_id, revision)
            if commit is None:
                return self._error(404, 'RevisionNotFound', f'Revision {revision} not found')
            data = hub.files(repo_id, commit).get(filename)
            if data is None:
                return self._error(404, 'EntryNotFound', f'{filename} does not exist at {revision}',
                                   {'X-Repo-Commit': commit})
            headers = {'X-Repo-Commit': commit, 'ETag': f'"{hashlib.sha256(data).hexdigest()}"'}
            if self.command == 'HEAD':
                # like the Hub: point the client at the commit-pinned URL, so the GET cannot race a new commit
                headers['Location'] = f'{hub.endpoint}/{repo_id}/resolve/{commit}/{parts[4]}'
            self._send(200, data, headers, content_type='application/octet-stream')

        def do_HEAD(self) -> None:
            self._resolve_file(self._record())

        def do_GET(self) -> None:
            path = self._record()
            if path == '/api/agent-harnesses':  # huggingface_hub's best-effort agent detection: an empty registry
                return self._json(200, {'standardEnvVars': [], 'harnesses': {}})
            self._resolve_file(path)

        def do_POST(self) -> None:
            path = self._record()
            body = self._body()
            if path.startswith('/api/') and not self.headers.get('Authorization'):
                return self._error(401, 'Unauthorized', 'write endpoints need a token')
            if path == '/api/repos/create':
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                if not hub.create_repo(repo_id):
                    # like the Hub, the conflict names the existing repo (create_repo(exist_ok=True) reads it)
                    message = 'You already created this model repo'
                    return self._json(409, {'error': message, 'url': f'{hub.endpoint}/{repo_id}'},
                                      {'X-Error-Message': message})
                return self._json(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id})
            if path == '/api/validate-yaml':
                content = json.loads(body)['content']
                if not content.startswith('---\n'):
                    return self._json(400, {'errors': [{'message': 'README.md has no YAML front matter'}]})
                return self._json(200, {'errors': [], 'warnings': []})
            parts = path.split('/')  # ['', 'api', 'models', org, name, 'preupload'|'commit', revision]
            if len(parts) == 7 and parts[2] == 'models' and parts[5] in ('preupload', 'commit'):
                repo_id, revision = f'{parts[3]}/{parts[4]}', unquote(parts[6])
                if repo_id not in hub.repos:
                    return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
                if revision not in hub.repos[repo_id]['refs']:
                    return self._error(404, 'RevisionNotFound', f'Branch {revision} not found')
                if parts[5] == 'preupload':
                    files = json.loads(body)['files']
                    return self._json(200, {'files': [
                        {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None}
                        for f in files]})
                return self._commit(repo_id, revision, body)
            self._unhandled(path)

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            files, message = {}, ''
            for line in body.splitlines():
                item = json.loads(line)
                if item['key'] == 'header':
                    message = item['value']['summary']
                elif item['key'] == 'file' and item['value'].get('encoding') == 'base64':
                    files[item['value']['path']] = base64.b64decode(item['value']['content'])
                else:
                    return self._error(400, 'BadRequest', f"commit operation {item['key']!r} is not emulated")
            oid = hub.commit(repo_id, revision, files, message)
            self._json(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{oid}', 'commitOid': oid,
                             'pullRequestUrl': None, 'success': True})

    return Handler
