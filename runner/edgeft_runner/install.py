"""Install a signed bundle on this device: A/B slots, verify -> smoke test -> switch -> commit, or roll back.

The steps of `install` (each is a line in <root>/install.log, and a name for EDGEFT_INSTALL_FAULT):
  recover         a pending install whose installer died, or begun before a reboot: back to `previous`
  verify-signature the manifest's signature with a key in <root>/keys, the version rule, runtime and arch
  clear-slot      the inactive slot is emptied (its entry removed from state.json first) and the store
                  files only it used are deleted
  store-copy      (--bundle) the bundle's files go into the store by content
  link-slot       the slot is made of hard links into the store
  verify-slot     signature, every file's sha256 and the expiry, in the slot
  smoke-test      golden logits within atol, exact match on a few task examples, a short latency run
  switch          state.json records the install as pending, then `current` is re-pointed
  post-install    the user's command (e.g. restart the app), through /bin/sh -c
  health-check    the user's command, retried every second until it passes or grace_s ends
  commit          the slot is marked good and the version becomes the channel's highest
A failed health check rolls back: state first, then `current`, then post_install again so the app
reloads the previous model. state.json is always written before `current` follows it, so whatever
point a power cut hits, the next command (or `boot-check` at boot) finds a state it can finish or undo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import RunnerError
from .backends import create_backend, runtime_version
from .bundle import bundle_path, load_manifest, sha256_file, verify_bundle
from .measure import load_model, load_task, prompt_ids, smoke_test, summarize_ms, task_accuracy, time_repeated
from .signature import (SIGNATURE_FILE, check_expiry, load_trusted_keys, public_key_line, read_public_key,
                        read_signature_file, verify_manifest_signature, verify_signed_bundle)
from .slots import SLOT_NAMES, InstallRoot, boot_id, fault_point, fsync_dir, now_iso, write_bytes_durably

SMOKE_EXAMPLES = 8  # task examples run by the smoke test: seconds on a gateway, enough to catch a broken model
# The accuracy floor on those few examples is the fewest correct answers a model that really has the
# bundle's accuracy reaches with probability >= 1 - FALSE_REFUSAL (binomial), so a good model is almost
# never refused while a broken one (0 of 8) always is. The full gate is the host's job (`edgeft measure`).
FALSE_REFUSAL = 0.01
LATENCY_CALLS = 20  # the short latency run: too few for a p99 (MIN_SAMPLES), enough for a median
COMMAND_TIMEOUT_S = 120.0  # post_install
HEALTH_RETRY_S = 1.0
LOCK_WAIT_S = 60.0
DISK_MARGIN_BYTES = 1 << 20
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv8": "aarch64"}
HEX = set("0123456789abcdef")


class SmokeFailed(Exception):
    """The new bundle ran on this device and failed: exit 1, the previous version keeps running."""


def _say(message: str) -> None:
    print(f"edgeft-runner: {message}", file=sys.stderr, flush=True)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= HEX


def _arch(name: str) -> str:
    name = name.lower()
    return ARCH_ALIASES.get(name, name)


def _release(manifest: dict) -> tuple[str, int]:
    return manifest["release"]["channel"], manifest["release"]["version"]


def slot_summary(state: dict, name: str | None) -> dict | None:
    """{"slot", "bundle", "version", "channel", "status", "installed_at"} of a slot, or None when empty."""
    if name is None or state["slots"].get(name) is None:
        return None
    return {"slot": name, **state["slots"][name]}


def run_command(command: str, root: InstallRoot, timeout_s: float) -> tuple[int | None, str]:
    """Run a user's command through /bin/sh -c in its own process group (killed whole on timeout).
    (exit status or None on timeout, last output line). The app finds the model at $EDGEFT_CURRENT."""
    env = {**os.environ, "EDGEFT_INSTALL_ROOT": str(root.root), "EDGEFT_CURRENT": str(root.current)}
    env.pop("EDGEFT_INSTALL_FAULT", None)
    proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=str(root.root), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 0.1))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, _ = proc.communicate()
        code = None
    lines = out.decode("utf-8", errors="replace").strip().splitlines()
    return code, (lines[-1][:200] if lines else "")


def min_correct(n: int, p: float, alpha: float = FALSE_REFUSAL) -> int:
    """The fewest correct answers out of n that a model with exact match p reaches with probability >= 1 - alpha."""
    p = min(max(p, 0.0), 1.0)
    below = 0.0  # P(X < k)
    for k in range(n + 1):
        pk = math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if below + pk > alpha:
            return k
        below += pk
    return n


def recorded_accuracy(manifest: dict) -> float | None:
    """The host's exact match of the model in this bundle: the last build stage that measured one."""
    stages = (manifest.get("provenance") or {}).get("stages") or []
    for stage in reversed(stages):
        accuracy = (stage.get("metrics") or {}).get("accuracy") if isinstance(stage, dict) else None
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool):
            return float(accuracy)
    return None


def accuracy_reference(manifest: dict, n_test: int) -> tuple[float | None, str]:
    """The exact match a good install of this bundle should show, and where it comes from: the higher of
    profile.budgets.min_accuracy and the recorded accuracy less budgets.max_accuracy_drop (all signed).
    The recorded accuracy is a measurement on the n_test task examples, so it enters as its rule-of-
    succession estimate (correct + 1) / (n + 2): a perfect score on a finite test set is not a promise of
    never missing, and demanding 8 of 8 would refuse a good model over one borderline example."""
    budgets = (manifest.get("profile") or {}).get("budgets") or {}
    candidates = []
    if isinstance(budgets.get("min_accuracy"), (int, float)):
        candidates.append((float(budgets["min_accuracy"]), "budgets.min_accuracy"))
    recorded = recorded_accuracy(manifest)
    if recorded is not None:
        drop = budgets.get("max_accuracy_drop")
        drop = float(drop) if isinstance(drop, (int, float)) else 0.0
        estimate = (recorded * n_test + 1) / (n_test + 2)
        candidates.append((estimate - drop, f"recorded accuracy {recorded:g} on {n_test} examples - max_accuracy_drop {drop:g}"))
    if not candidates:
        return None, "the bundle records no accuracy (no build stage measured one, no budgets.min_accuracy)"
    return max(candidates)


def latency_budget_ms(manifest: dict) -> float | None:
    """profile.budgets.latency_ms_p99 for the warm loop (a plain number means warm)."""
    budget = ((manifest.get("profile") or {}).get("budgets") or {}).get("latency_ms_p99")
    if isinstance(budget, dict):
        budget = budget.get("warm")
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None


def smoke_test_slot(slot_dir: Path, manifest: dict, latency_check: bool) -> dict:
    """Load the model from the slot and check it: golden logits, a few task examples, a short latency run.
    Raises SmokeFailed naming what failed; returns what it measured."""
    try:
        threads = manifest.get("threads") or os.cpu_count() or 1
        threads = max(1, min(int(threads), os.cpu_count() or int(threads)))
        backend = create_backend(manifest.get("runtime", "onnxruntime"))
        load_model(backend, slot_dir, manifest, threads)
        result: dict = {"golden": smoke_test(backend, bundle_path(slot_dir, manifest["golden"]["file"]),
                                             float(manifest["golden"].get("atol", 1e-3)))}
        fault_point("mid-smoke-test")
        task = load_task(bundle_path(slot_dir, manifest["task"]["file"]))
        examples = task["examples"][:SMOKE_EXAMPLES]
        accuracy = task_accuracy(backend, {**task, "examples": examples}, manifest["model"]["eos_token_id"])
        reference, source = accuracy_reference(manifest, len(task["examples"]))
        if reference is None:
            accuracy.update(required=None, note=f"not checked: {source}")
        else:
            required = min_correct(len(examples), reference)
            accuracy.update(required=required, reference=round(reference, 4), source=source)
            if accuracy["correct"] < required:
                raise SmokeFailed(f"task exact match {accuracy['correct']}/{accuracy['n']} below the {required} that a model "
                                  f"with exact match {reference:.3f} ({source}) reaches")
        result["accuracy"] = accuracy
        budget = latency_budget_ms(manifest)
        if not latency_check or budget is None:
            result["latency"] = {"checked": False, "note": "--no-latency-check" if not latency_check
                                 else "no profile.budgets.latency_ms_p99 in the bundle"}
        else:
            prompt = prompt_ids(int(manifest["measure"]["prompt_tokens"]), manifest["model"]["vocab_size"])
            empty = backend.empty_past()
            loop = time_repeated(lambda: backend.forward(prompt, empty), 0.1, 0.0, LATENCY_CALLS)
            p50 = summarize_ms(loop.samples_ms)["p50"]
            # A median over the p99 budget means most calls missed it (so the p99 did too): a gross miss, a wrong
            # device class or a slow fallback, not the noise of a short run. The full p99 gate is `edgeft measure`'s.
            result["latency"] = {"checked": True, "p50_ms": p50, "n": len(loop.samples_ms), "budget_p99_ms": budget}
            if p50 > budget:
                raise SmokeFailed(f"latency p50 {p50:g} ms over the p99 budget {budget:g} ms ({len(loop.samples_ms)} calls; "
                                  "--no-latency-check skips this on an emulated or busy device)")
        return result
    except SmokeFailed:
        raise
    except RunnerError as exc:  # measure.smoke_test says "smoke test failed: ..." itself; the caller says it once
        message = str(exc)
        raise SmokeFailed(message[len("smoke test failed: "):] if message.startswith("smoke test failed: ") else message) from None
    except Exception as exc:  # a runtime's own exception types: the model does not run here
        raise SmokeFailed(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}") from None


class Installer:
    """One command on one install root: runs steps (timed, logged, fault points), keeps the state."""

    def __init__(self, root: InstallRoot, command: str):
        self.root = root
        self.command = command
        self.steps: list[dict] = []
        self.state: dict = {}
        self.recovered: dict | None = None
        self.ident: dict = {"bundle": None, "version": None, "channel": None, "slot": None}

    # --- steps and log ------------------------------------------------------------------------------------

    @contextmanager
    def step(self, name: str, started: float | None = None) -> Iterator[dict]:
        """A named step: fault point on entry, timing (from `started` if the work began earlier), one
        install.log line when it completes."""
        fault_point(name)
        detail: dict = {}
        started = time.monotonic() if started is None else started
        yield detail
        seconds = round(time.monotonic() - started, 3)
        self.steps.append({"step": name, "s": seconds})
        self.log(name, "ok", detail=detail or None)
        _say(f"{self.command}: {name} ok ({seconds:g} s)")

    def log(self, step: str, result: str, detail: object = None, **ident) -> None:
        self.root.log(step, result, detail=detail, **{**self.ident, **ident})

    def save(self) -> None:
        self.root.write_state(self.state)

    # --- recovery -----------------------------------------------------------------------------------------

    def recover(self, run_post_install: bool = True) -> dict | None:
        """Finish or undo what a crash left. Called with the lock held, before anything else. Returns what
        was rolled back (None when nothing was pending or the pending install is still legitimately open)."""
        root, state = self.root, self.root.read_state()
        self.state = state
        rolled = None
        pending = state["pending"]
        if pending is not None:
            now_boot = boot_id()
            rebooted = bool(pending.get("boot_id")) and bool(now_boot) and pending["boot_id"] != now_boot
            # The installer holds the lock from start to end, and this command holds it now and has written
            # nothing yet: a pending install not waiting for `commit` (--defer-commit) has lost its installer,
            # whatever its recorded pid (in a container a new process may get the same one). The pid is for the log.
            orphaned = not pending.get("deferred")
            if rebooted or orphaned:
                reason = ("the device rebooted before the install was committed" if rebooted else
                          f"the installer (pid {pending.get('pid')}) stopped before committing")
                # After a reboot the app starts afresh on `current`; without one it may hold the new model: reload it.
                command = pending.get("post_install") if run_post_install and not rebooted else None
                rolled = self.roll_back_pending(reason, command, step="recover", remember=bool(pending.get("deferred")))
        # state.json is the truth and `current` follows it: re-point a link a crash left behind.
        if root.current_slot() != state["active"] or (state["active"] is None and os.path.lexists(str(root.current))):
            root.point_current(state["active"])
            self.log("recover", "relinked", detail={"current": state["active"]}, slot=state["active"])
        for name in SLOT_NAMES:  # half-built slots (no state entry) and leftovers of a killed verify
            if state["slots"][name] is None and name != state["active"] and root.slot_dir(name).exists():
                shutil.rmtree(str(root.slot_dir(name)))
                self.log("recover", "removed-half-built-slot", slot=name)
        for leftover in root.root.glob(".verify-*"):
            shutil.rmtree(str(leftover), ignore_errors=True)
        self.recovered = rolled
        return rolled

    def roll_back_pending(self, reason: str, post_install: str | None, step: str, remember: bool = False) -> dict:
        """Undo the pending install: state first (previous active, new slot failed), then `current`, then
        post_install so the app reloads the previous model. `remember`: an install that waited for `commit`
        (--defer-commit) was undone behind its caller's back (a reboot): the next `commit` must fail."""
        state = self.state
        pending = state["pending"]
        new, previous = pending["slot"], pending["previous"]
        failed = state["slots"].get(new)
        if failed is not None:
            failed["status"] = "failed"
        state["active"], state["pending"] = previous, None
        ident = {"bundle": failed and failed["bundle"], "version": failed and failed["version"],
                 "channel": failed and failed.get("channel"), "slot": new}
        if remember:
            state["uncommitted_rollback"] = {**ident, "reason": reason, "time": now_iso()}
        self.save()
        fault_point("rollback-switch")
        self.root.point_current(previous)
        fault_point("after-rollback-switch")
        ran = None
        if post_install:
            code, last = run_command(post_install, self.root, COMMAND_TIMEOUT_S)
            ran = {"exit": code, "output": last}
        self.root.log(step, "rolled-back", detail={"reason": reason, "back_to": previous, "post_install": ran}, **ident)
        _say(f"{self.command}: rolled back to slot {previous or '(none)'}: {reason}")
        return {"slot": new, "back_to": previous, "reason": reason, **{k: v for k, v in ident.items() if k != "slot"}}

    # --- install ------------------------------------------------------------------------------------------

    def trusted_keys(self) -> dict:
        trusted = load_trusted_keys(self.root.keys)
        if not trusted:
            raise RunnerError(f"no trusted keys in {self.root.keys}: run `trust-key --root {self.root.root} edgeft.pub` "
                              "with the signer's public key first")
        return trusted

    def read_store(self, sha: str, what: str) -> bytes:
        if not _is_sha256(sha):
            raise RunnerError(f"--{what} must be a lowercase sha256 hex digest, got {sha!r}")
        path = self.root.store_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RunnerError(f"{path} ({what}) is not in the store; send the bundle's files first") from None
        if _sha256_bytes(data) != sha:  # damaged since it arrived: drop it so the next flash sends it again
            path.unlink()
            raise RunnerError(f"{path} ({what}) is damaged (sha256 differs); removed it: flash again")
        return data

    def verify_stored_manifest(self, bundle: str, signature: str, trusted: dict) -> tuple[dict, str]:
        """(manifest, key id) of store/<bundle> signed by store/<signature>, checked before any slot is touched:
        the two files are staged under their bundle names in a temp dir inside the root."""
        manifest_bytes = self.read_store(bundle, "manifest")
        signature_bytes = self.read_store(signature, "signature")
        with tempfile.TemporaryDirectory(prefix=".verify-", dir=str(self.root.root)) as tmp:
            staging = Path(tmp)
            (staging / "manifest.json").write_bytes(manifest_bytes)
            (staging / SIGNATURE_FILE).write_bytes(signature_bytes)
            signed = verify_manifest_signature(staging, trusted)
            check_expiry(signed, f"{self.root.store_path(bundle)} (manifest.json)")
            return load_manifest(staging), read_signature_file(staging)["key_id"]

    def check_fits_device(self, manifest: dict) -> None:
        runtime = manifest.get("runtime", "onnxruntime")
        if runtime_version(runtime) is None:
            raise RunnerError(f"the bundle needs runtime {runtime}, which does not import on this device "
                              f"({sys.executable}); install it or build for this device's target")
        want, have = manifest.get("arch"), platform.machine()
        if isinstance(want, str) and have and _arch(want) != _arch(have):
            raise RunnerError(f"the bundle is for {want} (target {manifest.get('target')}), this device is {have}; "
                              "build for this device's target")

    def check_version(self, manifest: dict, bundle: str, allow_downgrade: bool) -> None:
        """Rollback protection that needs no clock: never below the highest version committed on the channel,
        and one version is one bundle."""
        channel, version = _release(manifest)
        highest = self.state["highest_version"].get(channel)
        if highest is None or allow_downgrade:
            return
        if version < highest:
            raise RunnerError(f"version {version} is older than version {highest} already installed on channel {channel}; "
                              "sign a newer version, or pass --allow-downgrade to install it anyway")
        holder = self.state["highest_bundle"].get(channel)
        if version == highest and holder and holder != bundle:
            raise RunnerError(f"version {version} on channel {channel} is already bundle {holder[:12]}, not {bundle[:12]}; "
                              "sign this bundle with a higher version")

    def store_refs(self, slot_dir: Path) -> set[str]:
        """Store files a slot uses: its manifest, signature and every listed file (what can still be read)."""
        refs = set()
        try:
            data = (slot_dir / "manifest.json").read_bytes()
            refs.add(_sha256_bytes(data))
            refs.update(v for v in json.loads(data).get("files", {}).values() if _is_sha256(v))
        except (OSError, ValueError, AttributeError):
            pass
        try:
            refs.add(sha256_file(slot_dir / SIGNATURE_FILE))
        except OSError:
            pass
        return refs

    def place(self, manifest: dict, bundle: str, signature: str, source: Path | None, target: str,
              keep: set[str]) -> None:
        """clear-slot, store-copy (from `source`), link-slot: the bundle laid out in slot `target`."""
        root, state = self.root, self.state
        slot_dir = root.slot_dir(target)
        wanted = [("manifest.json", bundle), (SIGNATURE_FILE, signature), *manifest["files"].items()]
        old_refs = self.store_refs(slot_dir) - keep - {sha for _, sha in wanted}

        missing = [(rel, sha) for rel, sha in wanted if not root.store_path(sha).is_file()]
        if missing and source is None:
            rel, sha = missing[0]
            raise RunnerError(f"{root.store_path(sha)} ({rel}) is not in the store ({len(missing)} files missing); "
                              "send the bundle's files first")
        need = sum(bundle_path(source, rel).stat().st_size for rel, _ in missing) if source is not None else 0
        reclaim = sum(root.store_path(sha).stat().st_size for sha in old_refs if root.store_path(sha).is_file())
        free = shutil.disk_usage(str(root.root)).free
        if need and need + DISK_MARGIN_BYTES > free + reclaim:
            raise RunnerError(f"not enough free disk under {root.root}: need {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free "
                              f"(+{reclaim / 1e6:.1f} MB from the slot it replaces); free space or choose another --root")

        with self.step("clear-slot") as detail:
            if state["slots"][target] is not None:  # state first: a slot half-deleted is never listed as good
                detail["replaced"] = state["slots"][target]
                state["slots"][target] = None
                self.save()
            if slot_dir.exists():
                entries = sorted(slot_dir.iterdir())
                for index, entry in enumerate(entries):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(str(entry))
                    else:
                        entry.unlink()
                    if index == 0:
                        fault_point("mid-clear-slot")
            freed = 0
            for sha in old_refs:  # the replaced bundle's files nothing else uses (never the runner or partials)
                path = root.store_path(sha)
                if path.is_file():
                    freed += path.stat().st_size
                    path.unlink()
            detail["store_freed_bytes"] = freed

        if source is not None:
            with self.step("store-copy") as detail:
                copied = 0
                for rel, sha in missing:
                    copied += self.copy_into_store(bundle_path(source, rel), sha, rel)
                if missing:
                    fsync_dir(root.store)  # the renames into the store are durable before anything links to them
                detail.update(files_copied=len(missing), bytes_copied=copied, files_present=len(wanted) - len(missing))
            fault_point("after-store")

        with self.step("link-slot") as detail:
            slot_dir.mkdir(parents=True, exist_ok=True)
            copies = 0
            made_dirs = {slot_dir}
            for index, (rel, sha) in enumerate(wanted):
                dest = bundle_path(slot_dir, rel)
                if dest.parent not in made_dirs:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    made_dirs.add(dest.parent)
                if os.path.lexists(str(dest)):
                    dest.unlink()
                try:
                    os.link(str(root.store_path(sha)), str(dest))
                except OSError:  # a filesystem without hard links (vfat, some overlays): a read-only copy
                    size = root.store_path(sha).stat().st_size
                    if size + DISK_MARGIN_BYTES > shutil.disk_usage(str(root.root)).free:
                        raise RunnerError(f"not enough free disk under {root.root} to copy {rel} into slot {target} "
                                          f"(this filesystem has no hard links): need {size / 1e6:.1f} MB") from None
                    shutil.copyfile(str(root.store_path(sha)), str(dest))
                    os.chmod(str(dest), 0o444)
                    copies += 1
                if index == 0:
                    fault_point("mid-link-slot")
            for directory in made_dirs:
                fsync_dir(directory)
            detail.update(files=len(wanted), copied_not_linked=copies)

    def copy_into_store(self, src: Path, sha: str, rel: str) -> int:
        """Copy one file into store/<sha>: into .partial, hashed on the way, fsynced, checked, renamed."""
        partial = self.root.partial / sha
        digest, size = hashlib.sha256(), 0
        try:
            with open(str(src), "rb") as fin, open(str(partial), "wb") as fout:
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    fout.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    fault_point("mid-store-copy")
                fout.flush()
                os.fsync(fout.fileno())
        except OSError as exc:
            try:
                partial.unlink()
            except OSError:
                pass
            raise RunnerError(f"cannot copy {rel} into {self.root.store}: {exc.strerror or exc}") from None
        if digest.hexdigest() != sha:
            partial.unlink()
            raise RunnerError(f"{src} changed while it was being installed (sha256 differs from the manifest); copy the bundle again")
        os.chmod(str(partial), 0o444)
        os.replace(str(partial), str(self.root.store_path(sha)))
        return size

    def install(self, *, manifest_sha: str | None, signature_sha: str | None, bundle_dir: Path | None,
                allow_downgrade: bool, defer_commit: bool, post_install: str | None, health_check: str | None,
                grace_s: float, latency_check: bool) -> tuple[int, dict]:
        root = self.root
        self.recover()
        state = self.state
        self.forget_uncommitted_rollback()  # a new install decides anew
        trusted = self.trusted_keys()
        active = state["active"]
        previous = slot_summary(state, active)
        started = time.monotonic()

        current = state["slots"].get(active) if active else None
        if bundle_dir is not None:  # a local bundle: refuse a bad one before a byte goes into the store
            manifest = verify_signed_bundle(bundle_dir, trusted)
            bundle, signature = sha256_file(bundle_dir / "manifest.json"), sha256_file(bundle_dir / SIGNATURE_FILE)
        else:
            bundle, signature = manifest_sha, signature_sha
        damaged = None
        if current is not None and current["bundle"] == bundle and current["status"] == "good" and state["pending"] is None:
            try:  # the same bundle, intact in the active slot: nothing to do, nothing written
                manifest = verify_signed_bundle(root.slot_dir(active), trusted)
                self.ident.update(bundle=bundle, version=manifest["release"]["version"], channel=manifest["release"]["channel"])
                self.steps.append({"step": "verify-signature", "s": round(time.monotonic() - started, 3)})
                return 0, self.result("already-current", slot=active, previous=None)
            except RunnerError as exc:  # damaged on the device: install it again, into the other slot
                damaged = str(exc)
        if bundle_dir is None:
            manifest, key_id = self.verify_stored_manifest(bundle, signature, trusted)
        else:
            key_id = read_signature_file(bundle_dir)["key_id"]
        channel, version = _release(manifest)
        self.ident.update(bundle=bundle, version=version, channel=channel)
        pending = state["pending"]
        if pending is not None:  # left open by --defer-commit: the same bundle is done; another must wait
            pending_entry = state["slots"].get(pending["slot"]) or {}
            if pending_entry.get("bundle") == bundle:
                return 0, self.result("pending", slot=pending["slot"], previous=slot_summary(state, pending["previous"]),
                                      reason="installed, waiting for `commit`")
            raise RunnerError(f"bundle {str(pending_entry.get('bundle'))[:12]} in slot {pending['slot']} waits for "
                              "`commit` (or `rollback`); finish that first")

        with self.step("verify-signature", started) as detail:
            detail["key_id"] = key_id
            if damaged:
                detail["active_slot_damaged"] = damaged
            self.check_version(manifest, bundle, allow_downgrade)
            self.check_fits_device(manifest)

        target = next(name for name in SLOT_NAMES if name != active) if active else SLOT_NAMES[0]
        self.ident["slot"] = target
        keep = self.store_refs(root.slot_dir(active)) if active else set()
        self.place(manifest, bundle, signature, bundle_dir, target, keep)

        with self.step("verify-slot"):
            try:
                manifest = verify_signed_bundle(root.slot_dir(target), trusted)
            except RunnerError:
                self.drop_damaged_store_files(manifest)
                raise

        entry = {"bundle": bundle, "version": version, "channel": channel, "status": "pending", "installed_at": now_iso()}
        try:
            with self.step("smoke-test") as detail:
                detail.update(smoke_test_slot(root.slot_dir(target), manifest, latency_check))
                smoke = dict(detail)
        except SmokeFailed as exc:
            state["slots"][target] = {**entry, "status": "failed"}
            self.save()
            self.log("smoke-test", "failed", detail={"reason": str(exc)})
            _say(f"install: smoke test failed, nothing switched: {exc}")
            return 1, self.result("rolled-back", slot=active, previous=previous, reason=f"smoke test failed: {exc}")

        fault_point("before-switch")
        with self.step("switch"):
            state["slots"][target] = entry
            state["pending"] = {"slot": target, "previous": active, "boot_id": boot_id(), "pid": os.getpid(),
                                "since": round(time.time(), 3), "deferred": False, "post_install": post_install}
            state["active"] = target
            self.save()  # pending first: a crash from here on is rolled back by the next command or at boot
            fault_point("mid-switch")
            root.point_current(target)
        fault_point("after-switch")
        try:
            failure = self.after_switch(post_install, health_check, grace_s)
        except (RunnerError, OSError) as exc:  # e.g. no /bin/sh, a full disk: the new bundle is not proven, go back
            failure = f"install stopped after the switch: {exc}"
        if failure is not None:
            self.roll_back_pending(failure, post_install, step="rollback")
            return 1, self.result("rolled-back", slot=self.state["active"], previous=previous, reason=failure)

        if defer_commit:
            state["pending"]["deferred"] = True  # only `commit`, `rollback` or a reboot end it now
            self.save()
            self.log("install", "pending", detail={"smoke": smoke})
            return 0, self.result("pending", slot=target, previous=previous, smoke=smoke, reason="waiting for `commit`")
        fault_point("before-commit")
        self.mark_good(target)
        self.log("install", "installed", detail={"smoke": smoke, "previous": previous})
        return 0, self.result("installed", slot=target, previous=previous, smoke=smoke)

    def after_switch(self, post_install: str | None, health_check: str | None, grace_s: float) -> str | None:
        """post_install, then the health check until it passes or grace_s ends; why the new bundle failed, or None."""
        if post_install:
            with self.step("post-install") as detail:
                code, last = run_command(post_install, self.root, COMMAND_TIMEOUT_S)
                detail.update(exit=code, output=last)
            if code != 0:  # the app did not take the new model: as good as a failed health check
                return f"post_install exited {code if code is not None else 'on timeout'}{': ' + last if last else ''}"
        if health_check:
            passed, attempts, last = self.wait_healthy(health_check, grace_s)
            if not passed:
                return f"health check failed {attempts} times in {grace_s:g} s: {last}"
        return None

    def wait_healthy(self, command: str, grace_s: float) -> tuple[bool, int, str]:
        deadline = time.monotonic() + grace_s
        attempts = 0
        with self.step("health-check") as detail:
            while True:
                attempts += 1
                code, last = run_command(command, self.root, max(deadline - time.monotonic(), HEALTH_RETRY_S))
                fault_point("mid-health-check")
                if code == 0:
                    break
                last = f"exit {code if code is not None else 'timeout'}{': ' + last if last else ''}"
                if time.monotonic() + HEALTH_RETRY_S > deadline:
                    detail.update(passed=False, attempts=attempts, last=last)
                    return False, attempts, last
                time.sleep(HEALTH_RETRY_S)
            detail.update(passed=True, attempts=attempts)
        return True, attempts, ""

    def mark_good(self, slot: str) -> None:
        """The slot becomes good and its version the channel's highest; the pending install ends."""
        state = self.state
        entry = state["slots"][slot]
        entry["status"] = "good"
        state["pending"] = None
        channel, version = entry["channel"], entry["version"]
        if version >= state["highest_version"].get(channel, 0):
            state["highest_version"][channel] = version
            state["highest_bundle"][channel] = entry["bundle"]
        with self.step("commit"):
            self.save()

    def drop_damaged_store_files(self, manifest: dict) -> None:
        """A slot that failed its hashes: delete the store files that no longer match their names, so the next
        flash sends them again (the store is trusted by name otherwise)."""
        for sha in set(manifest["files"].values()):
            path = self.root.store_path(sha)
            if path.is_file() and sha256_file(path) != sha:
                path.unlink()
                self.log("verify-slot", "removed-damaged-store-file", detail={"sha256": sha})

    def result(self, result: str, *, slot: str | None, previous: dict | None, reason: str | None = None,
               **extra) -> dict:
        return {"result": result, "slot": slot, "bundle": self.ident["bundle"], "version": self.ident["version"],
                "channel": self.ident["channel"], "previous": previous, "reason": reason, "steps": self.steps,
                "recovered": self.recovered, **extra}

    # --- commit, rollback, status -------------------------------------------------------------------------

    def forget_uncommitted_rollback(self) -> dict | None:
        """Clear (and return) the record of a deferred install a reboot undid: reported once, by the next
        commit, or made moot by the next rollback or install."""
        marker = self.state.pop("uncommitted_rollback", None)
        if marker is not None:
            self.save()
        return marker

    def commit(self) -> tuple[int, dict]:
        self.recover()
        state = self.state
        rolled = self.forget_uncommitted_rollback()
        if rolled is not None:  # Mender's ArtifactCommit after a reboot: the install it would commit is gone
            self.ident.update(bundle=rolled["bundle"], version=rolled["version"], channel=rolled["channel"])
            return 1, self.result("rolled-back", slot=state["active"], previous=None,
                                  reason=f"nothing to commit: {rolled['reason']}, so it was rolled back")
        pending = state["pending"]
        if pending is None:
            active = slot_summary(state, state["active"])
            if active:
                self.ident.update(bundle=active["bundle"], version=active["version"], channel=active["channel"])
            return 0, self.result("nothing-pending", slot=state["active"], previous=None, reason="no install waits for commit")
        entry = state["slots"][pending["slot"]]
        self.ident.update(bundle=entry["bundle"], version=entry["version"], channel=entry["channel"], slot=pending["slot"])
        self.mark_good(pending["slot"])
        self.log("commit", "installed")
        return 0, self.result("installed", slot=pending["slot"], previous=slot_summary(state, pending["previous"]))

    def rollback(self, post_install: str | None) -> tuple[int, dict]:
        rolled = self.recover()
        state = self.state
        self.forget_uncommitted_rollback()
        if rolled is None and state["pending"] is not None:
            rolled = self.roll_back_pending("rollback requested", post_install or state["pending"].get("post_install"),
                                            step="rollback")
        if rolled is not None:
            self.ident.update(bundle=rolled["bundle"], version=rolled["version"], channel=rolled["channel"], slot=rolled["slot"])
            return 0, self.result("rolled-back", slot=state["active"], previous=None, reason=rolled["reason"])
        active = state["active"]
        other = next((name for name in SLOT_NAMES if name != active), None)
        entry = state["slots"].get(other) if other else None
        if active is None or entry is None or entry["status"] != "good":
            raise RunnerError(f"nothing to roll back to: slot {other} holds no good bundle "
                              f"({entry['status'] if entry else 'empty'}); flash the version you want instead")
        self.ident.update(bundle=entry["bundle"], version=entry["version"], channel=entry["channel"], slot=other)
        with self.step("verify-slot"):  # verified at its install; check it is still intact before running it again
            verify_bundle(self.root.slot_dir(other))
        previous = slot_summary(state, active)
        with self.step("switch"):
            state["active"] = other
            self.save()
            fault_point("rollback-switch")
            self.root.point_current(other)
        if post_install:
            with self.step("post-install") as detail:
                code, last = run_command(post_install, self.root, COMMAND_TIMEOUT_S)
                detail.update(exit=code, output=last)
        self.log("rollback", "rolled-back", detail={"from": active})
        return 0, self.result("rolled-back", slot=other, previous=previous, reason="rollback requested")


def status(root: InstallRoot, last: int = 10) -> dict:
    """Both slots, the active one, what `current` points at, a pending install, the last log lines. Recovers
    first when no installer is running (one that is running owns the pending state)."""
    installer = Installer(root, "status")
    fd = root.try_lock() if root.root.is_dir() else None  # a root that does not exist yet is reported, not created
    if fd is not None:
        try:
            installer.recover()
            state = installer.state
        finally:
            os.close(fd)
    else:
        state = root.read_state()
    slots = {}
    for name in SLOT_NAMES:
        entry = state["slots"][name]
        slots[name] = None if entry is None else {**entry, "path": str(root.slot_dir(name)), "active": name == state["active"]}
    return {"result": "status", "root": str(root.root), "active": state["active"], "current": root.current_slot(),
            "installer_running": fd is None and root.root.is_dir(), "pending": state["pending"], "slots": slots, "state": state,
            "recovered": installer.recovered, "log": root.read_log(last)}


def trust_key(root: InstallRoot, pub_file: Path) -> dict:
    key_id, raw = read_public_key(pub_file)
    root.ensure_layout()
    dest = root.keys / f"{key_id}.pub"
    already = dest.is_file() and dest.read_text(encoding="utf-8", errors="replace") == public_key_line(raw)
    if not already:
        write_bytes_durably(dest, public_key_line(raw).encode("ascii"))
        root.log("trust-key", "trusted", detail={"key_id": key_id})
    return {"result": "trusted", "key_id": key_id, "path": str(dest), "already": already}


# --- command line ------------------------------------------------------------------------------------------

def _emit(result: dict) -> None:
    print(json.dumps(result, sort_keys=True), flush=True)


def _refused(command: str, exc: Exception, installer: Installer | None) -> int:
    reason = str(exc)
    _say(reason)
    if installer is not None and installer.state:
        try:
            installer.log(command, "refused", detail={"reason": reason})
        except RunnerError:
            pass
    ident = installer.ident if installer is not None else {}
    _emit({"result": "refused", "slot": None, "bundle": ident.get("bundle"), "version": ident.get("version"),
           "channel": ident.get("channel"), "previous": None, "reason": reason,
           "steps": installer.steps if installer is not None else []})
    return 2


def _locked_command(args, command: str, body) -> int:
    """Lock the root, run body(installer) -> (exit code, result), print the JSON; a RunnerError is a refusal."""
    installer = None
    try:
        root = InstallRoot(args.root)
        installer = Installer(root, command)
        with root.locked(args.wait_s):
            code, result = body(installer)
    except (RunnerError, OSError) as exc:
        return _refused(command, exc, installer)
    if command != "install" or result["result"] != "already-current":
        _say(f"{command}: {result['result']}" + (f" ({result['reason']})" if result.get("reason") else ""))
    else:
        _say(f"install: bundle {result['bundle'][:12]} (version {result['version']}) is already current in slot {result['slot']}")
    _emit(result)
    return code


def cmd_install(args) -> int:
    if (args.bundle is None) == (args.manifest is None):
        raise RunnerError("give either --bundle DIR or --manifest SHA --signature SHA")
    if (args.manifest is None) != (args.signature is None):
        raise RunnerError("--manifest and --signature go together (the sha256 of manifest.json and of manifest.sig in "
                          "the store); with --bundle DIR give neither")
    bundle_dir = Path(args.bundle).resolve() if args.bundle else None
    if bundle_dir is not None and not bundle_dir.is_dir():
        raise RunnerError(f"bundle directory not found: {args.bundle}")
    return _locked_command(args, "install", lambda inst: inst.install(
        manifest_sha=args.manifest, signature_sha=args.signature, bundle_dir=bundle_dir,
        allow_downgrade=args.allow_downgrade, defer_commit=args.defer_commit, post_install=args.post_install,
        health_check=args.health_check, grace_s=args.grace_s, latency_check=not args.no_latency_check))


def cmd_commit(args) -> int:
    return _locked_command(args, "commit", lambda inst: inst.commit())


def cmd_rollback(args) -> int:
    return _locked_command(args, "rollback", lambda inst: inst.rollback(args.post_install))


def cmd_boot_check(args) -> int:
    if not Path(args.root).is_dir():  # nothing was ever installed here: nothing to check, nothing to create
        _say(f"boot-check: no install root at {args.root} yet")
        _emit({"result": "ok", "slot": None, "bundle": None, "version": None, "channel": None, "previous": None,
               "reason": "no install root yet", "steps": [], "recovered": None})
        return 0

    def body(inst: Installer) -> tuple[int, dict]:
        rolled = inst.recover(run_post_install=False)
        active = slot_summary(inst.state, inst.state["active"])
        if active:
            inst.ident.update(bundle=active["bundle"], version=active["version"], channel=active["channel"])
        return 0, inst.result("rolled-back" if rolled else "ok", slot=inst.state["active"], previous=None,
                              reason=rolled["reason"] if rolled else None)
    return _locked_command(args, "boot-check", body)


def cmd_status(args) -> int:
    info = status(InstallRoot(args.root), args.log_lines)
    if args.json:
        _emit(info)
        return 0
    print(f"root     {info['root']}")
    print(f"current  -> {'slots/' + info['current'] if info['current'] else '(none)'}")
    for name, entry in info["slots"].items():
        mark = "*" if entry and entry["active"] else " "
        print(f"slot {name} {mark} " + ("empty" if entry is None else
              f"{entry['status']:8} {entry['channel']} v{entry['version']}  bundle {entry['bundle'][:12]}  {entry['installed_at']}"))
    pending = info["pending"]
    print("pending  " + ("none" if pending is None else
                         f"slot {pending['slot']} (previous {pending['previous']}, "
                         f"{'waiting for commit' if pending.get('deferred') else 'installer pid ' + str(pending.get('pid'))})"))
    print("highest  " + (", ".join(f"{c} v{v}" for c, v in sorted(info["state"]["highest_version"].items())) or "none"))
    for entry in info["log"]:
        print(f"  {entry.get('time')} {entry.get('step'):16} {entry.get('result'):12} "
              f"v{entry.get('version')} {str(entry.get('bundle') or '')[:12]} {entry.get('slot') or ''}")
    return 0


def cmd_trust_key(args) -> int:
    result = trust_key(InstallRoot(args.root), Path(args.pubfile))
    _say(f"trust-key: {'already trusted' if result['already'] else 'trusted'} key {result['key_id']} ({result['path']})")
    _emit(result)
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def add_commands(sub) -> None:
    """The install commands, on the runner's subparsers (edgeft_runner.__main__)."""
    raw = argparse.RawDescriptionHelpFormatter

    def root_arg(parser, wait: bool = True) -> None:
        parser.add_argument("--root", required=True, help="the install root (absolute), e.g. /var/lib/edgeft")
        if wait:
            parser.add_argument("--wait-s", type=_seconds, default=LOCK_WAIT_S,
                                help=f"wait this long for another installer's lock (default {LOCK_WAIT_S:g})")

    p = sub.add_parser(
        "install", help="install a signed bundle into the inactive slot: verify, smoke-test, switch, commit",
        formatter_class=raw,
        description="Install a signed bundle with A/B slots. The bundle goes into the inactive slot (hard links\n"
                    "into <root>/store), is verified there (signature with a key in <root>/keys, every sha256,\n"
                    "expiry, version rule), smoke-tested (golden logits, a few task examples, a short latency\n"
                    "run), then <root>/current is switched and the install is pending until post_install\n"
                    "and the health check pass; then it is marked good. A failed smoke test switches nothing;\n"
                    "a failed health check switches back and runs post_install again.\n"
                    "Prints one JSON line: result installed | already-current | pending | rolled-back | refused.\n"
                    "Exit 0 ok, 1 the new bundle failed (the previous version runs), 2 refused.",
        epilog="examples:\n"
               "  python3 runner.pyz install --root /var/lib/edgeft --bundle ./bundle\n"
               "  python3 runner.pyz install --root /var/lib/edgeft --manifest SHA --signature SHA \\\n"
               "      --post-install 'systemctl restart my-app' --health-check 'curl -sf localhost:8080/ok' --grace-s 30")
    root_arg(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--bundle", help="a bundle directory on this device (copied into the store first)")
    source.add_argument("--manifest", help="sha256 of manifest.json already in <root>/store (files sent by `edgeft flash`)")
    p.add_argument("--signature", help="sha256 of manifest.sig in <root>/store (with --manifest)")
    p.add_argument("--allow-downgrade", action="store_true", help="install a version older than the channel's highest")
    p.add_argument("--defer-commit", action="store_true",
                   help="stop after the health check with the install pending; `commit` or `rollback` ends it, a reboot rolls it back")
    p.add_argument("--post-install", help="shell command run after the switch (and again after a rollback), e.g. restart the app")
    p.add_argument("--health-check", help="shell command that exits 0 when the app works on the new model; retried every second")
    p.add_argument("--grace-s", type=_seconds, default=30.0, help="how long the health check may take to pass (default 30)")
    p.add_argument("--no-latency-check", action="store_true",
                   help="skip the smoke test's latency run (emulated or busy devices)")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("commit", help="mark the pending install good (after install --defer-commit)",
                       formatter_class=raw, description="Mark the pending slot good and raise the channel's highest version.\n"
                       "A pending install that a reboot interrupted was already rolled back: exit 1 then.",
                       epilog="example:\n  python3 runner.pyz commit --root /var/lib/edgeft")
    root_arg(p)
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("rollback", help="switch back to the other slot (or cancel a pending install)",
                       formatter_class=raw, description="Cancel a pending install, or switch `current` back to the other slot\n"
                       "when it holds a good bundle whose files still verify. Exit 2 when there is nothing to go back to.",
                       epilog="example:\n  python3 runner.pyz rollback --root /var/lib/edgeft --post-install 'systemctl restart my-app'")
    root_arg(p)
    p.add_argument("--post-install", help="shell command run after switching back (e.g. restart the app)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="show both slots, the active one, a pending install and the install log",
                       formatter_class=raw, description="Show the install root: both slots (version, channel, status, bundle),\n"
                       "what `current` points at, a pending install and the last install.log lines.",
                       epilog="example:\n  python3 runner.pyz status --root /var/lib/edgeft --json")
    root_arg(p, wait=False)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--log-lines", type=int, default=10, help="install.log lines to show (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("trust-key", help="trust a public key (edgeft.pub) for signed bundles",
                       formatter_class=raw, description="Copy a public key file (one line: ed25519 <base64> <key id>, as written by\n"
                       "`edgeft keys new`) into <root>/keys/<key id>.pub. Bundles signed by it may then be installed.",
                       epilog="example:\n  python3 runner.pyz trust-key --root /var/lib/edgeft edgeft.pub")
    root_arg(p, wait=False)
    p.add_argument("pubfile", help="the public key file")
    p.set_defaults(func=cmd_trust_key)

    p = sub.add_parser("boot-check", help="at boot: roll back an install the reboot interrupted",
                       formatter_class=raw, description="For an init script, before the app starts: an install that was pending\n"
                       "when the device went down (or whose installer died) is rolled back, and `current` is made\n"
                       "to match state.json.",
                       epilog="example (systemd ExecStartPre of the app):\n  python3 /opt/edgeft/runner.pyz boot-check --root /var/lib/edgeft")
    root_arg(p)
    p.set_defaults(func=cmd_boot_check)
