"""Run-folder safety, in one place that a learner can skip: one-sentence errors and exit
statuses, the Ctrl-C / SIGTERM message, the folder lock, atomic saves, checkpoint checks,
resuming and metrics repair. Nothing here is about self-supervised learning.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import pickle
import reprlib
import shutil
import signal
import stat
import sys

import torch

FORMAT = "normssl-1"  # marks checkpoints and run folders written by this project
METHODS = ("simclr", "simsiam", "byol", "moco")  # the only modules a checkpoint's 'method' may name
# Flags that may change when resuming without changing what is being trained.
RESUME_SAFE = {"epochs", "knn_every", "save_every", "device", "precision", "compile", "data_dir", "download", "resume",
               "out"}
# What an interrupted run can tell its user: the folder and the epoch that last.pt holds.
# created: the folder, if this run made it; written: the outputs saved; args: the run's flags, for messages.
STATUS = {"folder": None, "saved": None, "lock": None, "created": None, "written": [], "args": None}


class UsageError(Exception):
    """Bad input from the user: printed as one sentence, exit status 2."""


class RunFailed(Exception):
    """The run itself failed (not the input): one sentence, exit status 1."""


def cli(main):
    """Run main() as a command, the one error boundary of every script: bad input (UsageError) is one line on stderr
    and exit status 2; a failed run (RunFailed, OSError with its path, running out of memory) one line and 1, and
    the run folder this run made is removed while it holds no checkpoint; Ctrl-C or SIGTERM says what is safe."""
    STATUS.update(folder=None, saved=None, created=None, written=[], args=None)  # main() may run more than once
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 is printed escaped, never a crash
        stream.reconfigure(errors="backslashreplace")
    # Ctrl-C raises KeyboardInterrupt even where the parent started us with SIGINT ignored
    # (a background job of a script), and SIGTERM unwinds the same way.
    handlers = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except (UsageError, RunFailed, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, RunFailed) and not out_of_memory(e):
            raise  # a bug: its traceback is the message
        folder = STATUS["created"]  # the run folder this run made, removed while it holds no checkpoint
        if folder and os.path.isdir(folder) and not any(f.endswith(".pt") for f in os.listdir(folder)):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"error: {failure(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt as e:
        folder, saved, written = STATUS["folder"], STATUS["saved"], STATUS["written"]
        again = f"python <script> --resume auto --out {folder}"
        left = (f"wrote {', '.join(written)} before it" if written else "nothing was written") if folder is None \
            else (f"no epoch had finished, so {folder} holds no checkpoint; `{again}` starts the run again from "
                  "epoch 0" if saved is None else f"{os.path.join(folder, 'last.pt')} holds epoch {saved}; `{again}` "
                  "continues from there")
        print(f"{e.args[0] if e.args else 'interrupted'}; {left}", file=sys.stderr)
        sys.exit(143 if e.args else 130)
    finally:
        unlock_folder()
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


# The flags that size what is allocated, named when memory runs out.
SIZING = ("batch_size", "accum", "arch", "width", "proj_dim", "pred_dim", "hidden_dim", "mlp_dim", "queue")


def out_of_memory(e):
    """Whether e is an allocation failure: Python's, CUDA's, or the CPU allocator's (a RuntimeError)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e) \
        or "not enough memory" in str(e)


def failure(e):
    """The one sentence for an error that ends the program."""
    if isinstance(e, OSError):
        return f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else f"{e.strerror or e}"
    if not out_of_memory(e):
        return str(e)
    args = STATUS["args"]
    flags = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in SIZING if hasattr(args, k))
    what = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return (f"out of memory ({what}); lower what sizes the network and the batch: {flags}" if flags
            else f"out of memory ({what}); free memory, or lower the batch size")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _terminate(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")  # unwinds like Ctrl-C: temporary files are removed


# ----------------------------------------------------------------------------- the run folder

def open_folder(method, args):
    """(args, checkpoint or None, folder, notes): where a run writes and what it resumes. A resumed run
    keeps its saved flags but the RESUME_SAFE ones typed now; a folder without a checkpoint restarts
    from its args.json; any other non-empty folder is refused, so nothing that exists is overwritten."""
    path = None if not args.resume else os.path.join(args.out, "last.pt") if args.resume == "auto" and args.out \
        else os.path.join(args.resume, "last.pt") if os.path.isdir(args.resume) else args.resume
    if args.resume == "auto" and not args.out:
        raise UsageError("--resume auto needs --out pointing at the run folder to continue")
    if path and os.path.exists(path):
        ckpt = {**check_checkpoint(load_checkpoint(path), path), "path": path}
        if ckpt["method"] != method:
            raise UsageError(f"{path} is a {ckpt['method']} checkpoint; resume it with {ckpt['method']}.py")
        folder = os.path.dirname(os.path.abspath(path))
        if args.out and os.path.abspath(args.out) != folder:
            raise UsageError(f"a resumed run stays in its own folder {folder}; drop --out or make it match")
        last = os.path.join(folder, "last.pt")
        later = load_checkpoint(last)["epoch"] if os.path.abspath(path) != last and os.path.exists(last) else -1
        if later > ckpt["epoch"]:
            raise UsageError(f"resuming from epoch {ckpt['epoch']} would overwrite {last} (epoch {later}); "
                             "copy the checkpoint into a new folder and resume it there")
        args = merge_resume_args(check_args(ckpt["args"], type(args), path), args)
        if ckpt["epoch"] >= args.epochs:
            print(f"{path} has finished all {ckpt['epoch']} epochs; nothing to do (pass --epochs N with "
                  f"N > {ckpt['epoch']} to train on). Next: python eval_knn.py {path} --all")
            sys.exit(0)
        return args, ckpt, folder, []
    if args.resume and args.resume != "auto":
        raise UsageError(f"--resume {args.resume}: no checkpoint there; pass a last.pt, its run folder, "
                         "or --resume auto --out FOLDER")
    folder = args.out or os.path.join("runs", f"{method}-{args.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--out {folder} is a file, not a folder; choose another --out")
    leftovers = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    notes = list(args.notes)
    if args.resume == "auto" and leftovers <= {"args.json", "metrics.jsonl", "lock"}:
        try:
            with open(os.path.join(folder, "args.json")) as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("format") == FORMAT and saved.get("method") == method \
                and isinstance(saved.get("args"), dict):
            # The run stopped before its first checkpoint: the same run again, from epoch 0.
            args = merge_resume_args(check_args(saved["args"], type(args), f"{folder}/args.json"), args)
            notes = [f"{folder} has no checkpoint yet: starting from epoch 0 with the flags of its args.json"]
        elif leftovers:
            why = f" (its args.json is not a {method} run's)" if "args.json" in leftovers else ""
            notes.append(f"{folder} has no checkpoint yet: starting from epoch 0 with the flags typed now{why}")
    elif leftovers:
        raise UsageError(f"output folder {folder} already exists and is not empty; pass --resume auto "
                         f"--out {folder} to continue a run there, or choose another --out")
    return args, None, folder, notes


def claim_folder(folder, method, args, ckpt):
    """Create and lock the run folder; keep metrics.jsonl to the epochs of the checkpoint
    being resumed (none for a new run), and record a new run's flags in args.json."""
    try:
        STATUS.update(created=None if os.path.exists(folder) else folder, args=args)
        os.makedirs(folder, exist_ok=True)
        lock_folder(folder)
        STATUS.update(folder=folder, saved=ckpt["epoch"] if ckpt else None)
        trim_metrics(os.path.join(folder, "metrics.jsonl"), ckpt["epoch"] if ckpt else 0)
        if not ckpt:
            with open(os.path.join(folder, "args.json"), "w") as fh:
                json.dump({"format": FORMAT, "method": method, "args": dataclasses.asdict(args)}, fh, indent=1)
    except OSError as e:  # a read-only parent, a file in the path, a full disk
        raise UsageError(f"--out {folder}: cannot write there ({e.strerror or e}); choose another --out")


def merge_resume_args(saved, new):
    """The saved args, plus the resume-safe flags typed on this command line; typed flags
    that would change the method are refused."""
    saved, given = dataclasses.asdict(saved), getattr(new, "given", set())
    conflicts = [k for k in sorted(given - RESUME_SAFE) if k in saved and getattr(new, k) != saved[k]]
    if conflicts:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved[k]} -> {getattr(new, k)})" for k in conflicts)
        raise UsageError(f"cannot resume with a different {flags}: these define the run; start a new run instead")
    changed = {k: getattr(new, k) for k in given & RESUME_SAFE}
    for k, v in changed.items():
        if k not in ("resume", "out") and saved.get(k) != v:
            print(f"resuming with --{k.replace('_', '-')} {v} (was {saved.get(k)})", file=sys.stderr)
    return type(new)(**{**saved, **changed})


def lock_folder(folder):
    """Hold FOLDER/lock (our pid, created with O_EXCL) until this process exits, so that two
    runs never write into one folder. A lock whose process is gone is taken over."""
    path = os.path.join(folder, "lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise UsageError(f"{folder} is in use by another run (pid {pid}); wait for it to finish, "
                                 "or choose another --out")
            print(f"taking over {path}: its process ({pid or 'unknown'}) is no longer running", file=sys.stderr)
            os.remove(path)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        import atexit
        atexit.register(unlock_folder, path, os.getpid())
        STATUS["lock"] = path
        return
    raise UsageError(f"could not lock {path}; remove it if no run is using {folder}")


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def unlock_folder(path=None, pid=None):
    """Remove the lock this process holds (at exit, or when main() returns or fails)."""
    path, pid = path or STATUS.get("lock"), pid or os.getpid()
    try:
        if path and int(open(path).read().strip()) == pid:
            os.remove(path)
    except (OSError, ValueError):
        pass


def read_jsonl(path, valid=lambda row: type(row.get("epoch")) is int, shown="lines"):
    """The JSON objects of a metrics.jsonl, one per line, and the numbers of its damaged lines.
    A line is damaged when it is not a JSON object that `valid` accepts (a kill mid-write
    leaves half a line; a disk error, garbage); damaged lines are skipped with one warning."""
    rows, damaged = [], []
    with open(path, errors="replace") as fh:  # undecodable bytes make a damaged line, not a crash
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and valid(row):
                rows.append(row)
            else:
                damaged.append(i)
    if damaged:
        where = ", ".join(map(str, damaged[:3])) + (", ..." if len(damaged) > 3 else "")
        print(f"warning: skipped {len(damaged)} damaged line{'s' * (len(damaged) > 1)} of {path} (line {where})"
              + (f"; the other {len(rows)} {shown} are kept" if rows else ""), file=sys.stderr)
    return rows, damaged


def trim_metrics(path, epoch):
    """Rewrite metrics.jsonl to the epochs up to the checkpoint being resumed: drops lines
    written after it (a kill between the metrics line and the checkpoint) and damaged ones."""
    if os.path.exists(path):
        keep = [row for row in read_jsonl(path)[0] if row["epoch"] <= epoch]
        write_atomic(path, lambda fh: fh.writelines(json.dumps(row) + "\n" for row in keep))


def divergence_message(what, where, args, folder):
    """What went wrong, where (e.g. 'epoch 3, step 5'), the flag that most plausibly caused it and what was kept."""
    if args.cut < 1:  # dividing by c < 1 multiplies every initial weight: the embeddings overflow from the start
        cause = f"--cut {args.cut:g} multiplies every initial weight by {1 / args.cut:.3g}; use a --cut of 1 or more"
    elif args.power:
        cause = (f"GradScale (--power {args.power:g}) scales gradients by the embedding norm, so it needs a smaller "
                 "--lr or a longer --warmup")
    else:
        cause = f"--lr {args.lr:g} is likely too high" + (f", or --wd {args.wd:g} too large" if args.wd >= 1e-3 else "")
    saved = STATUS["saved"]
    kept = (f"{os.path.join(folder, 'last.pt')} still holds epoch {saved}, the last good one"
            if saved else "no checkpoint was written")
    return f"{what} at {where}; {cause}. Training stopped; {kept}"


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save through write_atomic; a checkpoint that cannot be saved says how to resume."""
    write_atomic(path, lambda fh: torch.save(obj, fh), "wb", f"; free some space and resume with --resume auto --out "
                                                             f"{os.path.dirname(os.path.abspath(path))}")


def write_atomic(path, write, mode="w", hint=""):
    """Every output's one way out: write(fh) into a temporary file in the same folder, synced to the disk, then rename
    it to path, so a kill, a crash or a full disk mid-write leaves the previous file intact and never a cut-off one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a lost mount: torch.save says RuntimeError
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was saved"
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunFailed(f"could not write {path} ({reason}); {kept}{hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    STATUS["written"].append(path)


KINDS = {stat.S_IFDIR: "folder", stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket", stat.S_IFCHR: "device",
         stat.S_IFBLK: "device"}


def check_input(path, what="input"):
    """path, if it is a regular file (or a link to one); else one sentence. os.stat never opens it, so a FIFO,
    whose read would wait for a writer forever, is refused instead of blocking."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UsageError(f"{what} {path} {'does not exist' if isinstance(e, FileNotFoundError) else e.strerror}")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what} {path} is a {KINDS.get(stat.S_IFMT(mode), 'special file')}, not a file")
    return path


def load_checkpoint(path):
    """Load a checkpoint written by this project, tensors only (weights_only=True): a file
    that carries pickled code is refused, never executed."""
    check_input(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # GLOBAL: the pickle names a function or class to import and call
        code = isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e)
        raise UsageError(f"{path} contains pickled code or objects other than tensors; refusing to load it" if code
                         else f"{path} is not a readable checkpoint (truncated or corrupt?)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} was not written by normssl (no '{FORMAT}' marker)")
    return ckpt


def _is_stats(v):  # [mean, std]: 3 finite numbers each, std > 0
    return (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(s, (list, tuple)) and len(s) == 3
            and all(type(x) in (int, float) and math.isfinite(x) for x in s) for s in v) and min(v[1]) > 0)


def _bad_tensor(k, v):  # plain CPU tensors only: meta or sparse ones would fail later, deep inside torch
    if not (isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
            and v.device.type == "cpu"):
        return f"{reprlib.repr(v)} at {reprlib.repr(k)}" if not isinstance(v, torch.Tensor) else \
            f"a {v.layout} {v.device.type} tensor at {reprlib.repr(k)}"


# What each field that rebuilding a network reads must be. 'method' is checked first: it picks
# a module to import. The method's own flags in 'args' are checked by check_args.
FIELDS = [
    ("method", lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(METHODS)}"),
    ("epoch", lambda v: type(v) is int and v >= 0, "an int >= 0"),
    ("img_size", lambda v: type(v) is int and v > 0, "a positive int"),
    ("num_classes", lambda v: type(v) is int and v > 0, "a positive int"),
    ("data_stats", _is_stats, "[mean, std] with 3 finite numbers each and std > 0"),
    ("args", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of flag names to values"),
    ("model", lambda v: isinstance(v, dict) and v, "a dict of parameter names to tensors"),
]


def refuse(path, field, want, got):
    return UsageError(f"{path} is not a valid normssl checkpoint: '{field}' must be {want} but is {got}; "
                      "refusing to load it (use a last.pt or epoch<N>.pt that a method script wrote)")


def check_checkpoint(ckpt, path):
    """Stop a crafted or damaged checkpoint with one sentence before anything it names is
    imported or built. Returns ckpt."""
    for field, ok, want in FIELDS:
        if not ok(ckpt.get(field)):
            raise refuse(path, field, want, reprlib.repr(ckpt.get(field)))  # an untrusted value's repr, bounded
    if bad := next(filter(None, (_bad_tensor(k, v) for k, v in ckpt["model"].items())), None):
        raise refuse(path, "model", "a dict of parameter names to dense CPU tensors", bad)
    if not all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point()):  # never saved by a run
        raise UsageError(f"{path} holds NaN or infinite weights (its run diverged); use an earlier checkpoint, e.g. "
                         "one of its epoch<N>.pt")
    return ckpt


def check_args(saved, cls, path):
    """The method's Args from a checkpoint's 'args': each flag of its field's type (an int is fine for a float), then
    validate() as for typed flags (Args.problem); flags it lacks take their defaults, unknown ones are ignored."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in saved:
            continue
        v, kind = saved[f.name], f.type  # the annotation: bool for --compile
        if not (type(v) is kind or (kind is float and type(v) is int) or v is f.default is None):  # --compile's auto
            raise refuse(path, f"args.{f.name}", f"{'an' if kind is int else 'a'} {kind.__name__}", reprlib.repr(v))
        values[f.name] = float(v) if kind is float else v
    if problem := (args := cls(**values)).problem():  # the rules a typed flag meets, met by a saved one
        raise UsageError(f"{path} holds a flag value the command line refuses: {problem}; refusing to load it")
    return args


def load_state(module, state, path, name=None):
    """module.load_state_dict(state), strict, with every mismatch in one sentence: a missing,
    unexpected, wrongly shaped or wrongly typed tensor (load_state_dict would convert the type)."""
    own = module.state_dict()
    wrong = [f"'{k}' is a {v.dtype} tensor of shape {tuple(v.shape)} where the network has {own[k].dtype} "
             f"{tuple(own[k].shape)}" for k, v in state.items() if k in own and
             (v.dtype != own[k].dtype or v.shape != own[k].shape)]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        first = f"it lacks '{missing[0]}'" if missing else f"it has an unexpected '{unexpected[0]}'"
        wrong.insert(0, f"{first} ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    if wrong:
        name = name or type(module).__name__.lower()
        raise UsageError(f"{path} does not match the {name} network its flags describe: {wrong[0]}; "
                         "refusing to load it")
    module.load_state_dict(state)
