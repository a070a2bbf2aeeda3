"""A dispatch flood: one publisher sending valid, signed dispatches at a fixed rate, and what
came back for them. Run as its own process (`python -m controller.tools.bench.flood ...`) so
its per-message work never shares a GIL or an event loop with the code that judges the
daemon (the flood bench, the flood e2e test).

Every message is a setpoint with its own id (`<prefix><i>`), the next seq and a fresh
`issued_at`; its target is `target_kw(i)`, so the accepted one with the highest index says
which target must govern at the end. The publisher is mosquitto's own client (`mosquitto_pub
-l -q 1`: one message per line of its stdin, QoS 1, a large in-flight window: a dispatcher
that floods does not wait for each PUBACK), fed at the rate in slices of TICK_S; Python alone
cannot publish 10,000 QoS 1 messages a second on a small machine. `mosquitto_sub` on the
site's `ack` hands every ack back, and each ack of this flood's ids is sorted: accepted,
`rate_limited`, anything else; duplicates and ids never acked are counted. The figures go to
stdout (and `--out`) as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from controller.wire import rfc3339
from controller.wire.jws import Signer
from controller.wire.signing import signed

RATE_LIMITED: Final = "rate_limited"
TICK_S: Final = 0.005
"""The publisher is fed in slices this long: at 10,000/s, 50 messages a slice."""
INFLIGHT: Final = 1000
"""`mosquitto_pub -M`: QoS 1 messages awaiting their PUBACK at once."""


def target_kw(i: int, lo: float, hi: float) -> float:
    """The target of message `i`: spread over lo..hi, never the same twice in a row."""
    return round(lo + (hi - lo) * ((i * 7919) % 1000) / 1000.0, 1)


@dataclass(slots=True)
class Figures:
    offered: int = 0
    """Dispatches handed to the publisher."""
    publish_s: float = 0.0
    """Seconds until the broker had them all (the offered rate is offered / publish_s)."""
    acked: int = 0
    """Distinct ids of this flood acked by the daemon."""
    ack_messages: int = 0
    """Ack messages that carried them (a grouped ack answers many dispatches)."""
    accepted: int = 0
    rate_limited: int = 0
    other: int = 0
    duplicates: int = 0
    last_accepted: int | None = None
    """Index of the last accepted dispatch (the one that must govern)."""
    last_accepted_id: str | None = None
    last_accepted_kw: float | None = None
    acks_done_s: float | None = None
    """Seconds from the first publish to the last ack of this flood (None: some missing)."""
    other_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        return self.offered - self.acked


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"flood: {name} not found (the mosquitto-clients package)")
    return path


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = args.root.rstrip("/")
        self.n = round(args.rate * args.seconds)
        self.fig = Figures()
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._t0 = 0.0
        self._all_acked = threading.Event()
        self._signer: Signer | None = None
        self._legacy: bytes | None = None
        if args.jws_kid:
            secret = Path(args.key_file).read_bytes().removesuffix(b"\n")
            self._signer = Signer.hs256(args.jws_kid, secret)
        elif args.key_file:
            self._legacy = Path(args.key_file).read_bytes().removesuffix(b"\n")

    def payload(self, i: int, issued_at: str) -> bytes:
        a = self.args
        body: dict[str, Any] = {
            "id": f"{a.prefix}{i}",
            "seq": a.first_seq + i,
            "issued_at": issued_at,
            "mode": "setpoint",
            "target_kw": target_kw(i, a.lo_kw, a.hi_kw),
            "ramp_s": 0,
        }
        if self._legacy is not None:
            body = signed(body, self._legacy)
        raw = json.dumps(body, separators=(",", ":")).encode()
        return raw if self._signer is None else self._signer.sign(raw)

    def _count(self, line: bytes) -> None:
        """One ack message: every dispatch of this flood it names (a grouped rate_limited
        ack names many: its `id` and those in `more`)."""
        try:
            ack = json.loads(line)
            names = [ack.get("id"), *(m.get("id") for m in ack.get("more") or ())]
        except (ValueError, AttributeError, TypeError):
            return
        accepted = ack.get("accepted") is True
        reason = str(ack.get("reason") or "")
        prefix = self.args.prefix
        fig = self.fig
        with self._lock:
            fig.ack_messages += 1
            for ident in names:
                if not isinstance(ident, str) or not ident.startswith(prefix):
                    continue
                try:
                    i = int(ident[len(prefix) :])
                except ValueError:
                    continue
                if i in self._seen:
                    fig.duplicates += 1
                    continue
                self._seen.add(i)
                fig.acked += 1
                if accepted:
                    fig.accepted += 1
                    if fig.last_accepted is None or i > fig.last_accepted:
                        fig.last_accepted = i
                elif reason.startswith(RATE_LIMITED):
                    fig.rate_limited += 1
                else:
                    fig.other += 1
                    key = reason[:60]
                    fig.other_reasons[key] = fig.other_reasons.get(key, 0) + 1
            if fig.acked == self.n and fig.acks_done_s is None:
                fig.acks_done_s = time.monotonic() - self._t0
                self._all_acked.set()

    def _read_acks(self, out: IO[bytes]) -> None:
        for line in out:
            self._count(line)

    def run(self) -> Figures:
        a = self.args
        where = ["-h", a.host, "-p", str(a.port)]
        sub = subprocess.Popen(
            [_tool("mosquitto_sub"), *where, "-q", "1", "-t", f"{self.root}/ack"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        pub: subprocess.Popen[bytes] | None = None
        try:
            assert sub.stdout is not None
            reader = threading.Thread(target=self._read_acks, args=(sub.stdout,), daemon=True)
            reader.start()
            time.sleep(0.5)  # mosquitto_sub's SUBACK: it prints nothing to wait on
            topic = f"{self.root}/dispatch"
            pub = subprocess.Popen(
                [_tool("mosquitto_pub"), *where, "-q", "1", "-M", str(INFLIGHT), "-l", "-t", topic],
                stdin=subprocess.PIPE,
            )
            assert pub.stdin is not None
            self._publish(pub.stdin)
            pub.stdin.close()
            pub.wait(30.0)  # it exits once the broker has every message (its PUBACKs)
            self.fig.publish_s = round(time.monotonic() - self._t0, 3)
            self.fig.offered = self.n
            self._all_acked.wait(a.ack_wait_s)
        finally:
            for proc in (pub, sub):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(5.0)
        fig = self.fig
        if fig.last_accepted is not None:
            fig.last_accepted_id = f"{a.prefix}{fig.last_accepted}"
            fig.last_accepted_kw = target_kw(fig.last_accepted, a.lo_kw, a.hi_kw)
        if fig.acks_done_s is not None:
            fig.acks_done_s = round(fig.acks_done_s, 3)
        return fig

    def _publish(self, stdin: IO[bytes]) -> None:
        rate, n = self.args.rate, self.n
        self._t0 = t0 = time.monotonic()
        i = 0
        while i < n:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            issued_at = rfc3339(time.time())
            stdin.write(b"".join(self.payload(k, issued_at) + b"\n" for k in range(i, due)))
            stdin.flush()
            i = due
            # To the next message's time, at least a slice (fed in batches, not one sleep
            # per message); behind schedule (a slow machine): straight on.
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(max(ahead, TICK_S))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Flood a rampd site's dispatch topic.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True, help="<prefix>/<site_id>")
    p.add_argument("--rate", type=float, default=10_000.0, help="dispatches per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--first-seq", type=int, default=None, help="default: now in microseconds")
    p.add_argument("--prefix", default="flood-", help="id prefix")
    p.add_argument("--lo-kw", type=float, default=0.0)
    p.add_argument("--hi-kw", type=float, default=1000.0)
    p.add_argument("--key-file", help="sign with this key (legacy sig, or HS256 with --jws-kid)")
    p.add_argument("--jws-kid", help="sign as a JWS (HS256) with this kid")
    p.add_argument("--ack-wait-s", type=float, default=30.0, help="wait this long for acks")
    p.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = p.parse_args(argv)
    if args.first_seq is None:
        args.first_seq = time.time_ns() // 1000
    if args.rate <= 0 or args.seconds <= 0:
        p.error("--rate and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fig = Flood(args).run()
    out = asdict(fig) | {"missing": fig.missing, "rate": args.rate, "seconds": args.seconds}
    text = json.dumps(out)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
