"""The labelling web app: server-rendered pages and the JSON API they use.

Pages (cookie session, started by opening ``/?token=TOKEN``):
  ``/``        the judging page (the annotator's next item), or "queue empty"
  ``/live``    live tasks: write a user turn, choose between two model replies (``--live-url``)
  ``/mine``    the annotator's own judgments
  ``/admin``   progress and live statistics (admins)
  ``/logout``  end the browser session

JSON API (``Authorization: Bearer TOKEN``, or the page's session cookie):
  ``GET  /api/me``                 who am I, how many judged, how many left
  ``GET  /api/next``               200 the next item in display order; 204 when the queue is empty
  ``POST /api/judgments``          201 stored; 200 the identical judgment was already stored;
                                   409 a different judgment of that item was already stored,
                                   or the item was not served to you; 422 invalid body
  ``POST /api/rankings``           a ranking task: ``{"item_id", "ranking": ["C", "A", "B"]}`` (labels
                                   as shown, best first); the same answers as ``/api/judgments``
  ``POST /api/live/turn``          ``{"user": "...", "after_item"?: id}``: two model replies to the
                                   conversation so far, as a pair served to the caller (503 when
                                   the app has no ``--live-url``, 502 when the model fails)
  ``GET  /api/judgments``          the caller's own judgments
  ``POST /api/skip``               ``{"item_id"}``: give the item back
  ``GET  /api/admin/stats``        progress, agreement, alpha, position bias, throughput
  ``GET  /api/admin/items``        every item: target, votes, majority side, agreement
  ``GET  /api/admin/judgments``    every judgment
  ``GET  /api/admin/export``       the preference-pair JSONL (``?keep_ties=true``; ``?format=battles``:
                                   the human votes as ``rlhfkit arena`` battles)
  ``POST /api/admin/escalate``     ``{"extra": N}``: disagreeing complete items get N more annotators

The routes are three routers, ``pages``, ``annotator_api`` (``/api/*``) and ``admin_api``
(``/api/admin/*``), that :func:`create_app` includes; what they share (the database, the lease,
the cookie flag, the templates) is one :class:`LabelState` on ``app.state.label``.

Everything shown is autoescaped by Jinja2 and the Content-Security-Policy allows only the
app's own script file, so model output containing ``<script>`` is shown as text and runs nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders

from rlhfkit.label import live, ranking, service, stats
from rlhfkit.label.battles import iter_battles
from rlhfkit.label.db import FLAGS, SCALE, Database, User
from rlhfkit.label.export import iter_rows
from rlhfkit.label.service import DEFAULT_LEASE_SECONDS, LabelError

HERE = Path(__file__).parent
COOKIE = "rlhfkit_label_session"
COOKIE_MAX_AGE = 30 * 24 * 3600

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders:
    """Pure ASGI middleware adding the security headers to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("Content-Security-Policy", CSP)
                h.setdefault("X-Content-Type-Options", "nosniff")
                h.setdefault("X-Frame-Options", "DENY")
                h.setdefault("Referrer-Policy", "no-referrer")  # tokens appear in sign-in URLs
                if not static:
                    h.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)

    def fmt_time(t):
        if t is None:
            return "–"
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    def pct(x, digits=0):
        return "–" if x is None else f"{100 * x:.{digits}f}%"

    def num(x, digits=2):
        return "–" if x is None else f"{x:.{digits}f}"

    env.filters.update(fmt_time=fmt_time, pct=pct, num=num)
    return env


@dataclass(frozen=True)
class LabelState:
    """What the routes share, kept on ``app.state.label`` and handed out by :func:`label_state`."""

    db: Database
    lease_seconds: float
    secure_cookies: bool
    templates: Environment
    live: live.LiveModels | None = None

    def render(self, name: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("user", None)
        return HTMLResponse(self.templates.get_template(name).render(**ctx), status_code=status)


def create_app(db: Database | str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
               secure_cookies: bool = False, live_models: live.LiveModels | None = None) -> FastAPI:
    """The app over ``db`` (a :class:`Database`, a SQLAlchemy URL or a SQLite path); with
    ``live_models``, the live page asks them for replies."""
    if not isinstance(db, Database):
        db = Database(db)
    app = FastAPI(title="rlhfkit label", docs_url=None, redoc_url=None)
    app.state.db = db
    app.state.label = LabelState(db, lease_seconds, secure_cookies, _templates(), live_models)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(LabelError, _label_error)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for router in (pages, annotator_api, admin_api):
        app.include_router(router)
    return app


async def _label_error(_request: Request, exc: LabelError):
    return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status)


# ---------------------------------------------------------------- shared state and authentication

async def label_state(request: Request) -> LabelState:
    """The dependency that hands a route its app's :class:`LabelState` (async: no thread hop)."""
    return request.app.state.label


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return None


def _user(db: Database, request: Request) -> User | None:
    token = _bearer(request)
    if token is not None:  # a bearer header is decisive, even next to a cookie
        return service.user_for_token(db, token)
    return service.user_for_session(db, request.cookies.get(COOKIE))


def api_user(request: Request, st: LabelState = Depends(label_state)) -> User:
    user = _user(st.db, request)
    if user is None:
        raise HTTPException(401, "missing or invalid token: send 'Authorization: Bearer TOKEN' "
                                 "(or sign in with /?token=TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


def api_admin(user: User = Depends(api_user)) -> User:
    if not user.is_admin:
        raise HTTPException(403, "admins only")
    return user


async def _json_body(request: Request):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise LabelError(415, "send the body as JSON with 'Content-Type: application/json'")
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise LabelError(422, f"the body is not valid JSON: {e}") from None


# ---------------------------------------------------------------- pages
pages = APIRouter()


@pages.get("/healthz", include_in_schema=False)
def healthz():
    return {"ok": True}


@pages.get("/", response_class=HTMLResponse)
def index(request: Request, token: str | None = None, st: LabelState = Depends(label_state)):
    if token is not None:
        return _sign_in(st, token)
    user = _user(st.db, request)
    if user is None:
        return st.render("signin.html", 401, problem=None)
    served = service.next_item(st.db, user.id, st.lease_seconds)
    remaining = service.queue_remaining(st.db, user.id, st.lease_seconds)
    judged = service.count_judgments(st.db, user.id)
    if served is None:
        return st.render("judge.html", user=user, served=None, judged=judged, remaining=0)
    if served.item.is_ranking:
        return st.render("rank.html", user=user, item=served.item, conversation=served.item.conversation(),
                         shown=served.shown(), flags=FLAGS, judged=judged, remaining=remaining)
    a, item = served.assignment, served.item
    right = "response_b" if a.left_side == "response_a" else "response_a"
    return st.render("judge.html", user=user, served=served, item=item,
                     conversation=item.conversation(), left_text=item.text(a.left_side),
                     right_text=item.text(right), flags=FLAGS, scale=SCALE,
                     judged=judged, remaining=remaining)


def _sign_in(st: LabelState, token: str) -> Response:
    """``/?token=TOKEN``: start a browser session and drop the token from the address bar."""
    user = service.user_for_token(st.db, token)
    if user is None:
        return st.render("signin.html", 401, problem="This sign-in link is not valid: the "
                         "token is unknown or has been replaced. Ask an admin for a new one.")
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, service.start_web_session(st.db, user.id), max_age=COOKIE_MAX_AGE,
                    httponly=True, samesite="lax", secure=st.secure_cookies, path="/")
    return resp


@pages.get("/live", response_class=HTMLResponse)
def live_page(request: Request, st: LabelState = Depends(label_state)):
    user = _user(st.db, request)
    if user is None:
        return st.render("signin.html", 401, problem=None)
    return st.render("live.html", user=user, enabled=st.live is not None, scale=SCALE, flags=FLAGS,
                     models=len(st.live.models) if st.live else 0)


@pages.get("/mine", response_class=HTMLResponse)
def mine(request: Request, st: LabelState = Depends(label_state)):
    user = _user(st.db, request)
    if user is None:
        return st.render("signin.html", 401, problem=None)
    return st.render("mine.html", user=user, judgments=service.judgments_of(st.db, user.id),
                     scale=SCALE, flag_names=FLAGS)


@pages.get("/admin", response_class=HTMLResponse)
def admin(request: Request, escalated: int | None = None, st: LabelState = Depends(label_state)):
    user = _user(st.db, request)
    if user is None:
        return st.render("signin.html", 401, problem=None)
    if not user.is_admin:
        return st.render("signin.html", 403, user=user,
                         problem="The admin pages are for admins; you are signed in as an annotator.")
    return st.render("admin.html", user=user, s=stats.summary(st.db), escalated=escalated)


@pages.post("/admin/escalate")
def admin_escalate(request: Request, extra: int = Form(...), st: LabelState = Depends(label_state)):
    user = _user(st.db, request)
    if user is None or not user.is_admin:
        raise HTTPException(403, "admins only")
    ids = service.escalate(st.db, extra)
    return RedirectResponse(f"/admin?escalated={len(ids)}", status_code=303)


@pages.get("/logout")
def logout(request: Request, st: LabelState = Depends(label_state)):
    service.end_web_session(st.db, request.cookies.get(COOKIE))
    resp = st.render("signin.html", 200, problem=None, signed_out=True)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# ---------------------------------------------------------------- annotator API
annotator_api = APIRouter()


@annotator_api.get("/api/me")
def api_me(user: User = Depends(api_user), st: LabelState = Depends(label_state)):
    return {"id": user.id, "name": user.name, "role": user.role,
            "judgments": service.count_judgments(st.db, user.id),
            "queue_remaining": service.queue_remaining(st.db, user.id, st.lease_seconds)}


@annotator_api.get("/api/next")
def api_next(user: User = Depends(api_user), st: LabelState = Depends(label_state)):
    served = service.next_item(st.db, user.id, st.lease_seconds)
    if served is None:
        return Response(status_code=204)
    return served.to_json(service.queue_remaining(st.db, user.id, st.lease_seconds))


@annotator_api.post("/api/judgments", status_code=201)
async def api_post_judgment(request: Request, user: User = Depends(api_user),
                            st: LabelState = Depends(label_state)):
    judgment = service.parse_judgment(await _json_body(request))
    status, data = await run_in_threadpool(service.record_judgment, st.db, user.id, judgment)
    return JSONResponse(data, status_code=status)


@annotator_api.post("/api/rankings", status_code=201)
async def api_post_ranking(request: Request, user: User = Depends(api_user),
                           st: LabelState = Depends(label_state)):
    given = ranking.parse_ranking(await _json_body(request))
    status, data = await run_in_threadpool(ranking.record_ranking, st.db, user.id, given)
    return JSONResponse(data, status_code=status)


@annotator_api.post("/api/live/turn", status_code=201)
async def api_live_turn(request: Request, user: User = Depends(api_user), st: LabelState = Depends(label_state)):
    if st.live is None:
        raise LabelError(503, "live tasks are off: start the app with --live-url URL --live-model NAME")
    text, after_item = live.parse_turn(await _json_body(request))
    served = await run_in_threadpool(live.start_turn, st.db, st.live, user.id, text, after_item)
    return JSONResponse(live.served_turn_json(served), status_code=201)


@annotator_api.get("/api/judgments")
def api_my_judgments(user: User = Depends(api_user), st: LabelState = Depends(label_state)):
    return {"judgments": service.judgments_of(st.db, user.id, limit=100_000)}


@annotator_api.post("/api/skip")
async def api_skip(request: Request, user: User = Depends(api_user), st: LabelState = Depends(label_state)):
    body = await _json_body(request)
    item_id = body.get("item_id") if isinstance(body, dict) else None
    if isinstance(item_id, bool) or not isinstance(item_id, int):
        raise LabelError(422, f"item_id: must be an integer (got {item_id!r})")
    await run_in_threadpool(service.skip, st.db, user.id, item_id)
    return {"skipped": item_id}


# ---------------------------------------------------------------- admin API
admin_api = APIRouter()


@admin_api.get("/api/admin/stats")
def api_stats(_admin: User = Depends(api_admin), st: LabelState = Depends(label_state)):
    return stats.summary(st.db)


@admin_api.get("/api/admin/items")
def api_items(_admin: User = Depends(api_admin), st: LabelState = Depends(label_state)):
    return {"items": stats.items_agreement(st.db)}


@admin_api.get("/api/admin/judgments")
def api_all_judgments(_admin: User = Depends(api_admin), st: LabelState = Depends(label_state)):
    from sqlalchemy import select

    from rlhfkit.label.db import Judgment
    with st.db.reading() as s:
        rows = s.scalars(select(Judgment).order_by(Judgment.id)).all()
        return {"judgments": [service.judgment_to_json(j) for j in rows]}


@admin_api.get("/api/admin/export")
def api_export(keep_ties: bool = False, format: Literal["pairs", "battles"] = "pairs",
               _admin: User = Depends(api_admin), st: LabelState = Depends(label_state)):
    rows = iter_battles(st.db) if format == "battles" else iter_rows(st.db, keep_ties)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(body, media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{format}.jsonl"'})


@admin_api.post("/api/admin/escalate")
async def api_escalate(request: Request, _admin: User = Depends(api_admin), st: LabelState = Depends(label_state)):
    body = await _json_body(request)
    extra = body.get("extra") if isinstance(body, dict) else None
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 1:
        raise LabelError(422, f"extra: must be an integer >= 1 (got {extra!r})")
    max_agreement = body.get("max_agreement", 0.999)
    if isinstance(max_agreement, bool) or not isinstance(max_agreement, (int, float)):
        raise LabelError(422, "max_agreement: must be a number")
    ids = await run_in_threadpool(service.escalate, st.db, extra, float(max_agreement))
    return {"escalated": ids}
