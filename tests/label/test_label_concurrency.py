"""20 annotators judging in parallel over real HTTP (loopback) against `rlhfkit label serve`.

Every annotator loops GET /api/next -> POST /api/judgments until the queue is empty; every
fourth judgment is sent three times at once on three connections (a double-click, a retry racing
the original), and some are followed by a conflicting re-submission. At the end: no 5xx, every
judgment stored exactly once, none lost, every item judged by exactly K different annotators.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from label_helpers import add_users, bearer, import_pairs, make_pairs

from rlhfkit.label.db import Database

N_ANNOTATORS = 20
OVERLAP = 3
# SQLite is the default store and gets the full run; PostgreSQL (where a server can be started)
# gets a shorter one through the same code.
ITEMS = {"sqlite": 120, "postgresql": 20}


def test_twenty_annotators_in_parallel(db_url, request, live_server):
    backend = request.node.callspec.params["db_url"]
    N_ITEMS = ITEMS[backend]
    db_path = db_url
    db = Database(db_path)
    import_pairs(db, make_pairs(N_ITEMS), overlap=OVERLAP)
    users = add_users(db, N_ANNOTATORS)
    [(_, admin)] = add_users(db, 1, role="admin", prefix="boss")
    db.dispose()
    server = live_server(db_path)

    lock = threading.Lock()
    statuses: Counter = Counter()
    problems: list[str] = []
    sent: dict[tuple[int, int], int] = {}  # (user, item) -> likert shown, as accepted
    created_ids: list[int] = []
    start_gate = threading.Barrier(N_ANNOTATORS)

    def note(r: httpx.Response, what: str):
        with lock:
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                problems.append(f"{what}: {r.status_code} {r.text[:200]}")

    def annotator(k: int, uid: int, token: str):
        rng = random.Random(k)
        clients = [httpx.Client(base_url=server.url, headers=bearer(token), timeout=120)
                   for _ in range(3)]
        pool = ThreadPoolExecutor(3)
        try:
            start_gate.wait()
            n = 0
            while True:
                r = clients[0].get("/api/next")
                note(r, "next")
                if r.status_code == 204:
                    break
                if r.status_code != 200:
                    with lock:
                        problems.append(f"user {uid}: GET /api/next -> {r.status_code} {r.text[:200]}")
                    return
                item_id = r.json()["item_id"]
                body = {"item_id": item_id, "likert": rng.randint(1, 8), "rating": "good",
                        "flags": {"A": ["refusal"]} if n % 3 == 0 else {}, "rationale": f"{uid}/{n}"}
                copies = 3 if n % 4 == 0 else 1
                gate = threading.Barrier(copies)

                def submit(c, gate=gate, body=body):
                    gate.wait()
                    return c.post("/api/judgments", json=body)

                responses = list(pool.map(submit, clients[:copies]))
                for resp in responses:
                    note(resp, "judgment")
                codes = sorted(resp.status_code for resp in responses)
                ids = {resp.json().get("id") for resp in responses if resp.status_code in (200, 201)}
                if codes != [200] * (copies - 1) + [201] or len(ids) != 1:
                    with lock:
                        problems.append(f"user {uid} item {item_id}: {codes} ids {ids}")
                    return
                with lock:
                    sent[(uid, item_id)] = body["likert"]
                    created_ids.extend(ids)
                if n % 10 == 5:  # a different judgment of the same item: refused, first one stands
                    other = {**body, "likert": 9 - body["likert"]}
                    resp = clients[1].post("/api/judgments", json=other)
                    note(resp, "conflict")
                    if resp.status_code != 409:
                        with lock:
                            problems.append(f"user {uid} item {item_id}: conflict got {resp.status_code}")
                n += 1
        except Exception as e:  # noqa: BLE001 - reported below, with the others
            with lock:
                problems.append(f"user {uid}: {type(e).__name__}: {e}")
        finally:
            pool.shutdown()
            for c in clients:
                c.close()

    threads = [threading.Thread(target=annotator, args=(k, uid, tok)) for k, (uid, tok) in enumerate(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "annotator threads hung"
    assert problems == [], problems[:10]
    assert not [code for code in statuses if code >= 500]

    with httpx.Client(base_url=server.url, headers=bearer(admin), timeout=120) as c:
        stored = c.get("/api/admin/judgments").json()["judgments"]
        stats = c.get("/api/admin/stats").json()
    expected = N_ITEMS * OVERLAP
    pairs = [(j["user_id"], j["item_id"]) for j in stored]
    assert len(stored) == expected == len(sent) == len(created_ids)  # none lost
    assert len(set(pairs)) == len(pairs)  # none duplicated
    assert sorted(j["id"] for j in stored) == sorted(created_ids)
    assert all(sent[(j["user_id"], j["item_id"])] == j["likert"] for j in stored)  # as sent
    per_item = Counter(j["item_id"] for j in stored)
    assert set(per_item.values()) == {OVERLAP} and len(per_item) == N_ITEMS
    assert stats["progress"]["complete"] == N_ITEMS and stats["progress"]["open_assignments"] == 0

    requests = sum(statuses.values())
    print(f"\n[label concurrency, {backend}] {N_ANNOTATORS} annotators, {len(stored)} judgments stored "
          f"({requests} HTTP requests: {dict(sorted(statuses.items()))}) in {elapsed:.1f} s: "
          f"{len(stored) / elapsed:.1f} judgments/s, {requests / elapsed:.1f} requests/s; "
          f"position bias {stats['position_bias']['rate']:.3f}, "
          f"alpha {stats['agreement']['krippendorff_alpha']}")
