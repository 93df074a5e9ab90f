"""JupyterHub for Bulle: roles and scopes, the coordinator as a hub service, authenticator
and spawner.

Started by ``bulle demo up`` (after the coordinator: an external service must be up before
the hub, or the hub waits for it) as ``jupyterhub -f jupyterhub_config.py`` with:

- ``BULLE_HUB_STATE``: folder for the hub's database, cookie secret, users and homes;
- ``BULLE_HUB_PORT`` (public, the proxy), ``BULLE_HUB_API_PORT`` (the hub itself),
  ``BULLE_HUB_PROXY_API_PORT`` (the proxy's REST API);
- ``BULLE_COORDINATOR_URL``: the coordinator, registered as the service ``bulle``;
- ``BULLE_HUB_SERVICE_TOKEN_FILE``: the service's API token (also its OAuth secret; the
  coordinator reads the same file);
- ``BULLE_HUB_AUTH``: ``demo`` (default: per-user generated passwords, hashes in
  ``$BULLE_HUB_STATE/users.json``) or ``oidc`` (production, below);
- ``BULLE_HUB_SPAWN_SOCKET``: the root spawn broker's socket (``enclave/_spawnbroker.py``).

Processes: the hub never runs as root (it refuses to). With a spawn broker, each person's
server runs as their own system user ``jupyter-<name>``, created by the broker at their first
start; the hub and its proxy run as the hub's service user (``bulle-coord`` in the demo).
Without one, every server runs as the hub's own user (a developer's machine), homes under
``$BULLE_HUB_STATE/home``.

Roles: ``researcher`` (custom:bulle:query, custom:bulle:train), ``ethics-board``
(custom:bulle:approve, custom:bulle:audit), ``node-operator`` (custom:bulle:audit),
``observer`` (custom:bulle:observe: the standing indicators' pages, no query rights, no
notebook server), ``admin`` (JupyterHub's admin role, plus every custom scope through
``bulle-admin``).
Each also gets access to the ``bulle`` service (needed for its OAuth login). The
coordinator checks the scopes of the caller's token on every endpoint.
"""

import os
import sys
from pathlib import Path

from enclave import (
    CUSTOM_SCOPES,
    HOME,
    LAUNCHER,
    SERVICE,
    TEMPLATES,
    BrokeredSpawner,
    DemoAuthenticator,
    landing_url,
    prepare_home,
    read_users,
    refuse_server,
    roles_for,
)

c = get_config()  # noqa: F821 -- provided by JupyterHub when it loads this file
if os.geteuid() == 0:
    raise SystemExit("Bulle's hub does not run as root: run it as a service user, with the "
                     "spawn broker (python -m enclave._spawnbroker) as the only root process")

REPO = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv the hub runs in: singleuser, proxy
STATE = Path(os.environ.get("BULLE_HUB_STATE", REPO / ".bulle-demo" / "hub")).resolve()
STATE.mkdir(parents=True, exist_ok=True)
PORT = int(os.environ.get("BULLE_HUB_PORT", "8000"))
PUBLIC_URL = os.environ.get("BULLE_HUB_PUBLIC_URL", f"http://127.0.0.1:{PORT}")
COORDINATOR_URL = os.environ.get("BULLE_COORDINATOR_URL", "http://127.0.0.1:8700")

# -- hub, proxy, database --------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{PORT}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{os.environ.get('BULLE_HUB_API_PORT', '8081')}"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{os.environ.get('BULLE_HUB_PROXY_API_PORT', '8001')}")
# The PyPI (Python) configurable-http-proxy, from the same venv (TRAPS.md).
c.ConfigurableHTTPProxy.command = [str(BIN / "configurable-http-proxy")]
c.ConfigurableHTTPProxy.pid_file = str(STATE / "proxy.pid")
# Is the proxy still up? Every 30 s, not 5: the idle federation's CPU (issue 13); a proxy
# that dies is restarted by the hub at the next check.
c.ConfigurableHTTPProxy.check_running_interval = 30
c.JupyterHub.default_url = landing_url  # by role: only researchers get a server started
# Every hub page links to the Bulle home (navigation bar), the hub's home page too.
c.JupyterHub.template_paths = [str(TEMPLATES)]
c.JupyterHub.template_vars = {"bulle_home": f"/{HOME}"}
c.JupyterHub.cleanup_servers = True  # `bulle demo down` stops the hub: servers go too
c.JupyterHub.cleanup_proxy = True

# -- scopes, roles, the coordinator service --------------------------------------------------
c.JupyterHub.custom_scopes = {name: {"description": d} for name, d in CUSTOM_SCOPES.items()}
token_file = os.environ.get("BULLE_HUB_SERVICE_TOKEN_FILE")
service = {
    "name": SERVICE,
    "url": COORDINATOR_URL,  # the proxy routes /services/bulle/ there (the dashboard)
    "display": True,
    "info": {"what": "Bulle coordinator: federated SQL API and ethics-board dashboard"},
    "oauth_redirect_uri": f"{PUBLIC_URL}/services/{SERVICE}/oauth_callback",
    "oauth_no_confirm": True,
    # Scopes a dashboard login token may carry (narrowed to what the user holds).
    "oauth_client_allowed_scopes": list(CUSTOM_SCOPES),
}
if token_file:
    service["api_token"] = Path(token_file).read_text().strip()
c.JupyterHub.services = [service]

# -- authentication ----------------------------------------------------------------------------
if os.environ.get("BULLE_HUB_AUTH", "demo") == "oidc":
    # Production: the identity provider (e.g. the ministry's, or EduConnect/RENATER) logs
    # people in; its groups give the roles. Needs `pip install oauthenticator`.
    c.JupyterHub.authenticator_class = "generic-oauth"
    c.GenericOAuthenticator.client_id = os.environ["OIDC_CLIENT_ID"]
    c.GenericOAuthenticator.client_secret = os.environ["OIDC_CLIENT_SECRET"]
    c.GenericOAuthenticator.oauth_callback_url = f"{PUBLIC_URL}/hub/oauth_callback"
    c.GenericOAuthenticator.authorize_url = os.environ["OIDC_AUTHORIZE_URL"]
    c.GenericOAuthenticator.token_url = os.environ["OIDC_TOKEN_URL"]
    c.GenericOAuthenticator.userdata_url = os.environ["OIDC_USERINFO_URL"]
    c.GenericOAuthenticator.scope = ["openid", "profile", "email", "groups"]
    c.GenericOAuthenticator.username_claim = "preferred_username"
    c.GenericOAuthenticator.manage_groups = True
    c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
    c.GenericOAuthenticator.allowed_groups = {"bulle-researchers", "bulle-board",
                                              "bulle-operators", "bulle-observers",
                                              "bulle-admins"}
    c.GenericOAuthenticator.admin_groups = {"bulle-admins"}
    # Roles by group (groups are synced from the IdP at each login).
    groups = {"researcher": "bulle-researchers", "ethics-board": "bulle-board",
              "node-operator": "bulle-operators", "observer": "bulle-observers",
              "admin": "bulle-admins",
              "bulle-admin": "bulle-admins"}
    c.JupyterHub.load_roles = [{**r, "users": [], "groups": [groups[r["name"]]]}
                               for r in roles_for({})]
    # Production spawner: KubeSpawner (Zero to JupyterHub, deploy/k8s/z2jh-values.yaml) with
    # egress blocked except to the coordinator.
else:
    users_file = STATE / "users.json"
    users = read_users(users_file)
    c.JupyterHub.authenticator_class = DemoAuthenticator
    c.DemoAuthenticator.users_file = str(users_file)
    c.Authenticator.allowed_users = set(users)
    c.Authenticator.admin_users = {n for n, u in users.items() if u.get("role") == "admin"}
    c.JupyterHub.load_roles = roles_for(users)

# -- single-user servers ---------------------------------------------------------------------
if os.environ.get("BULLE_HUB_SPAWN_SOCKET"):
    # Each person's server as their own system user (created at first start), unable to
    # read node data or any key; the holders' source folders hidden (enclave/_spawnbroker).
    c.JupyterHub.spawner_class = BrokeredSpawner
    c.BrokeredSpawner.socket = os.environ["BULLE_HUB_SPAWN_SOCKET"]
    c.Spawner.pre_spawn_hook = refuse_server  # observers get no server
else:
    # Not root: processes of the hub's own user (no system accounts), homes in the state.
    c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
    c.SimpleLocalProcessSpawner.home_dir_template = str(STATE / "home" / "{username}")

    def _pre_spawn(spawner: object) -> None:
        refuse_server(spawner)  # observers get no server
        prepare_home(Path(spawner.home_dir))  # type: ignore[attr-defined]

    c.Spawner.pre_spawn_hook = _pre_spawn
c.Spawner.cmd = [str(BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
# No news or update checks: the enclave has no internet (and no pop-up in the demo).
# jupyter-server-proxy comes with jupyter-app-launcher (for launcher entries that start a
# local server, which Bulle has none of): its /proxy/<port> routes stay off.
c.Spawner.args = ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                  "--LabApp.news_url=None",
                  "--ServerApp.jpserver_extensions=jupyter_server_proxy=False"]
# The notebook's JUPYTERHUB_API_TOKEN: the server role's scopes plus Bulle's (narrowed by
# the hub to what the user holds). `from enclave import connect; connect()` sends it.
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server",
                                 "custom:bulle:query", "custom:bulle:train"]
# JUPYTER_APP_LAUNCHER_PATH: the launcher's "Bulle" card, which opens $BULLE_HUB_URL's
# /services/bulle/ (enclave/launcher/).
c.Spawner.environment = {"BULLE_URL": COORDINATOR_URL, "BULLE_HUB_URL": PUBLIC_URL,
                         "JUPYTER_APP_LAUNCHER_PATH": str(LAUNCHER)}
