"""
What a run of train.py runs on: its device, its CPU threads, its place among torchrun's processes
(torchrun sets RANK, LOCAL_RANK and WORLD_SIZE), including a resume on another number of them, and the
signals that stop it (Ctrl-C, and the SIGTERM that SLURM and Kubernetes send before they kill a job), and how its
processes leave when one of them fails.
"""
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, suppress
from datetime import timedelta

import torch
import torch.distributed as dist

from errors import UserError, output_lost, printable

DEVICES = r"auto|cpu|cuda(:\d+)?"  # the devices train.py's and sample.py's --device take


def resolve_device(cfg):
    """cfg's device as "cpu" or "cuda[:N]" ("auto": a GPU if one is visible), checked against this machine."""
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={dev!r} but no CUDA GPU is visible; use --device=cpu.")
    # a GPU past the visible ones: torch's own error came later, from deep inside the run
    if dev.startswith("cuda:") and int(dev[len("cuda:"):]) >= (count := torch.cuda.device_count()):
        gpus = "1 CUDA GPU is visible (cuda:0)" if count == 1 else \
            f"{count} CUDA GPUs are visible (cuda:0 to cuda:{count - 1})"
        raise UserError(f"device={dev!r} but only {gpus}; use --device=cuda:N with N below {count}, or "
                        "--device=cuda for the first.")
    if dev == "cpu" and cfg["compile"] and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++")
                                                   if c):
        raise UserError("compile=True on the CPU needs a C++ compiler and none was found: install g++ (or set CXX), "
                        "or leave compile off.")
    return dev


@contextmanager
def cuda_matmul_precision(tf32):
    """float32 matmuls on CUDA, for the duration: on TF32 tensor cores (about 8x IEEE float32's speed on an
    A100 or H100, 10 mantissa bits; torch's default is IEEE) or in IEEE float32. The CPU's are untouched."""
    m = torch.backends.cuda.matmul
    attr, value = ("fp32_precision", "tf32" if tf32 else "ieee") if hasattr(m, "fp32_precision") else \
        ("allow_tf32", bool(tf32))  # torch < 2.9
    old = getattr(m, attr)
    setattr(m, attr, value)
    try:
        yield
    finally:
        setattr(m, attr, old)


def others_running():
    """Tasks other than this one running right now (Linux's /proc/loadavg; elsewhere 0), the median of
    five samples over 0.1 s."""
    samples = []
    for _ in range(5):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            samples.append(0)
        time.sleep(0.02)
    return sorted(samples)[2]


def cpu_threads(cfg):
    """cfg threads, else OMP_NUM_THREADS, else this process's cores less those other jobs are running on
    right now. OpenMP threads that share a core with another job spin while they wait for it: beside
    one busy process on a 2-core machine a model step took 1.3 to 3.8 times as long with 2 threads as
    with 1 (bench.py --section=sharing), so a run that starts on a busy machine takes fewer."""
    if cfg["threads"]:
        return cfg["threads"]
    if os.environ.get("OMP_NUM_THREADS"):  # the user's (or study.py's) own choice stands
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # a node's processes share its cores (torchrun itself sets OMP_NUM_THREADS=1 for several, unless it is set)
    cores //= process_count("LOCAL_WORLD_SIZE", 1)
    return max(1, cores - others_running())


def use_cpu_threads(cfg, dev):
    """cfg with the CPU threads a run on the CPU uses (cpu_threads), now set: saved with its config, the count is kept
    by a resume, as rounding depends on it. A GPU run's cfg is returned as it is."""
    if dev.type != "cpu":
        return cfg
    torch.set_num_threads(cpu_threads(cfg))
    return {**cfg, "threads": torch.get_num_threads()}


DISTRIBUTED_TORCH = "2.7"  # the oldest release whose torchrun runs pass the tests (2.6's do not)


def release(version):
    """A torch version's (major, minor): "2.13.0+cpu" -> (2, 13)."""
    return tuple(int(part) for part in version.split(".")[:2])


def setup_distributed(cfg):
    """(rank, world size, device) of this process; joins the process group under torchrun."""
    dev = resolve_device(cfg)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(dev)
    try:  # torchrun sets all three; a launcher of its own, or a shell, may set them partly or wrongly
        rank, local_rank, world = (int(os.environ[n]) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if not (0 <= rank < world and 0 <= local_rank < world):
            raise ValueError
    except (KeyError, ValueError):
        found = ", ".join(f"{n}={os.environ.get(n)}" for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        raise UserError(f"the environment sets {found}, not a rank and local rank below WORLD_SIZE as torchrun does; "
                        "run under torchrun, or unset RANK.") from None
    # 2.6: FSDP2 fails on the CPU, distribute_tensor lacks src_data_rank, and a process that leaves breaks its peers'
    # gloo, so that a mistake under torchrun showed a traceback, not its sentence
    if release(torch.__version__) < release(DISTRIBUTED_TORCH):
        raise UserError(f"torchrun's processes (DDP, FSDP2) need torch >= {DISTRIBUTED_TORCH}, "
                        f"this is {torch.__version__}; upgrade torch, or run one process without torchrun.")
    if dev.startswith("cuda"):
        if local_rank >= (count := torch.cuda.device_count()):  # set_device named neither LOCAL_RANK nor a fix
            raise UserError(f"LOCAL_RANK={local_rank} but this node shows {count} CUDA GPU{'s' * (count != 1)}; run "
                            f"at most {count} process{'es' * (count != 1)} a node (torchrun --nproc_per_node={count}), "
                            "or make more GPUs visible (CUDA_VISIBLE_DEVICES).")
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return rank, world, torch.device(dev)


def keep_slices(cfg, ckpt, world, master):
    """A resume on another number of processes: grad_accum such that processes x grad_accum, the slices each
    global batch is cut into (their rows and dropout masks: data.get_batch, train.slice_seed), stay the run's, which
    then goes on as if uninterrupted (2 processes or 1 with grad_accum=2 train alike). Where no grad_accum can, it
    says so. Re-scoring keeps grad_accum (it draws no dropout masks), but its validation cuts batches as training
    does, and it cannot change batch_size or grad_accum either: where they do not split, it names the counts that do."""
    saved = len(ckpt["rng"]) if ckpt is not None else world  # one RNG state a process
    slices = saved * cfg["grad_accum"]
    cut = f"{slices} slice{'s' if slices > 1 else ''} ({saved} process(es) x grad_accum {cfg['grad_accum']})"
    if cfg["eval_only"] and saved != world and cfg["batch_size"] % (world * cfg["grad_accum"]):
        per = cfg["batch_size"] // cfg["grad_accum"]
        raise UserError(f"the run's batch_size={cfg['batch_size']} with grad_accum={cfg['grad_accum']} cannot be cut "
                        f"into slices for {world} processes to score its validation loss; score it on a number of "
                        f"processes that divides {per} (it trained on {saved}).")
    if saved == world or cfg["eval_only"]:
        return cfg
    if slices % world:
        if cfg["batch_size"] % (world * cfg["grad_accum"]):  # a resume keeps batch_size and grad_accum: name what fits
            raise UserError(f"the run cut each batch into {cut}, which {world} processes cannot split; resume it on "
                            f"a number of processes that divides {slices}.")
        if master:
            print(f"warning: the run cut each batch into {cut}, which {world} processes cannot: it goes on with "
                  "other dropout masks than an uninterrupted run; resume on a number of processes that divides "
                  f"{slices} to match it.",
                  file=sys.stderr)
        return cfg
    if master:
        print(f"resuming a run of {saved} process(es) on {world}: grad_accum {cfg['grad_accum']} -> "
              f"{slices // world}, so each batch is cut into the run's {slices} slices and dropout masks")
    return {**cfg, "grad_accum": slices // world}


def out_of_memory(e):
    """Whether an exception is the device's running out of memory: CUDA's, or the CPU allocator's."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))  # the CPU allocator's words


def out_of_memory_fix(cfg):
    """The sentence of a run out of memory: what to change (a resume or a re-scoring keeps the run's batch)."""
    batch = "" if cfg.get("init_from") == "resume" or cfg.get("eval_only") else \
        "lower batch_size per process (raise grad_accum to keep the global batch), or "
    return f"out of memory: {batch}set activation_checkpointing=True, or fsdp=True under torchrun."


def check_batch_split(cfg, world):
    """Each global batch is cut into processes x grad_accum slices of one size (data.get_batch): returns it."""
    if cfg["batch_size"] % (world * cfg["grad_accum"]):
        raise UserError(f"batch_size={cfg['batch_size']} must be a multiple of processes x grad_accum = "
                        f"{world * cfg['grad_accum']}.")
    return cfg["batch_size"] // (world * cfg["grad_accum"])


def dry_run_world(cfg):
    """The processes a dry run plans for: torchrun's, else dry_run_world_size (a resume's slices are kept for them,
    keep_slices, as a run on that many would)."""
    return process_count("WORLD_SIZE", cfg["dry_run_world_size"])


def process_count(name, default):
    """The count of processes the environment variable `name` gives (torchrun's WORLD_SIZE, LOCAL_WORLD_SIZE), else
    default where it is unset or empty. One that a shell or a launcher of its own set to 0, to text or below 0 was a
    ZeroDivisionError's traceback, or a dry run's plan for -1 GPUs with a negative micro-batch and memory."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        count = int(text)
    except ValueError:  # text ("two"), or nothing int() reads
        count = 0
    if count < 1:
        raise UserError(f"the environment sets {name}={text!r}, not a number of processes (1 or more) as torchrun "
                        f"sets it; unset {name}, or run under torchrun.")
    return count


def dry_run_split(cfg):
    """(processes, micro-batch) a dry run plans for (dry_run_world)."""
    world = dry_run_world(cfg)
    return world, check_batch_split(cfg, world)


INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C or SIGTERM after its checkpoint (the shell's 128 +
# SIGINT): `train.py && next` stops there, and a Kubernetes Job or a scheduler does not count the run as finished


def leave(code):
    """End the script with `code`. Under torchrun, DDP keeps gloo's process group, and its worker threads, alive past
    destroy_process_group: a worker still freeing a collective's tensors while the interpreter shuts down cannot take
    the GIL, and the process aborts ("terminate called without an active exception", once in CI). Every file is
    closed by now: leave without the interpreter's shutdown."""
    if "RANK" in os.environ:
        try:
            sys.stdout.flush()
        except OSError as e:  # a reader gone, a full disk: the code (and sentence) run_script ends with outside
            code = output_lost(e)  # torchrun, where sys.exit's SystemExit meets the same failed flush
            if code is None:  # another fault: its traceback and 1, as Python ends on an exception
                with suppress(OSError):
                    traceback.print_exc()
                code = 1
        with suppress(OSError):  # stderr's own reader gone, or its disk full: nothing left to tell anyone
            sys.stderr.flush()
        os._exit(code)  # whatever the flushes met: never the interpreter's shutdown
    if code:
        sys.exit(code)


def _torchrun_store():
    """torchrun's key-value store, which its agent holds (TORCHELASTIC_USE_AGENT_STORE), so that it outlives every
    process of the run; None outside torchrun, for one process, or where it does not answer within 5 s. A key is set
    or read there at once: no collective, nothing that waits for another process."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=5), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):  # the store's own errors are RuntimeErrors
        return None


def _store_key(name):  # a restart of the processes (torchrun --max_restarts) starts without the last one's keys
    return f"teamlora/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _failure_key():
    return _store_key("failed_with")


def tell_failure(code):
    """Leave the exit code of this process's failure where the run's other processes find it (first_failure): the
    first one told is kept."""
    with suppress(RuntimeError):
        if (store := _torchrun_store()) is not None:
            store.compare_set(_failure_key(), "", str(code))


def stopped_first(master):
    """Whether this process, stopped where its processes cannot agree to stop together (the scoring, whose collectives
    are not the loop's), is the one to say so: under torchrun the first process stopped, which also tells the others
    INTERRUPTED (tell_failure): they leave with it, not 143. A SIGTERM to one process other than rank 0 (a
    scheduler's, the kernel's) ended it alone, saying nothing, and rank 0, in a collective that lost it, was ended by
    torchrun before it could. None says it where another process failed first (torchrun's SIGTERM stopped this one):
    that one said why. Rank 0 says it where there is no store to ask (not under torchrun, one process)."""
    with suppress(RuntimeError):
        if (store := _torchrun_store()) is not None:
            first = store.compare_set(_failure_key(), "", str(INTERRUPTED))
            return first == str(INTERRUPTED).encode() and store.add(_store_key("stop_said"), 1) == 1
    return master


def first_failure():
    """The exit code of the run's process that failed first and said why (tell_failure), or None: none did, or not
    under torchrun. torchrun stops the others (SIGTERM), and they leave with it, as the refusal of a run is every
    process's: torchrun's summary names the one code, not 130 or a SIGTERM beside it."""
    with suppress(RuntimeError, ValueError):
        if (store := _torchrun_store()) is not None and store.check([_failure_key()]):
            return int(store.get(_failure_key()))
    return None


def _with_others():
    """Whether this process is one of torchrun's several, which it stops (SIGTERM) once one has failed, and runs in the
    main thread, where a handler for that can be set."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and os.environ.get("WORLD_SIZE", "1") != "1" and \
        _in_main_thread()


def _leaving(code=None):
    """The handler that ends a process of torchrun's, stopped (SIGTERM) because another failed first and said why: it
    leaves saying nothing, with the first failure's code (first_failure), else `code`, else the shell's 128 + the
    signal's number."""
    def stopped(signum, frame):
        leave(first_failure() or code or 128 + signum)
    return stopped


def wait_to_be_stopped(seconds, code=None):
    """torchrun stops every process (SIGTERM) once one has failed. Waits up to `seconds` for that: if it comes, or
    another process has failed already, that one failed first, and this one leaves as _leaving has it. No wait outside
    torchrun or without other processes."""
    if not _with_others():
        return
    for s in (signal.SIGTERM, signal.SIGINT):  # before the store is asked: a SIGTERM meanwhile ended it with -15
        signal.signal(s, _leaving(code))
    if first := first_failure():  # a collective that lost that process, or the same mistake: no need to wait
        leave(first)
    time.sleep(seconds)


def fail(message, code):
    """Print why the run fails, once under torchrun: its processes nearly always hit the same mistake (the same flags
    and files), so rank 0 prints it, and another rank only if torchrun has not stopped it within 10 s, i.e. if the
    mistake is its own (its node's files, say). The others are told its code (tell_failure). Returns `code`."""
    if os.environ.get("RANK", "0") != "0":
        wait_to_be_stopped(10, code)
    tell_failure(code)
    print(printable(message), file=sys.stderr)
    return code


def _in_main_thread():  # signals reach the main thread only: elsewhere handlers stay as they are
    return threading.current_thread() is threading.main_thread()


def takes_signal(signum):
    """Whether a run or a study may handle `signum`: in the main thread, and unless it was ignored when it began, as
    a shell ignores SIGINT for `python train.py &` in a script: a Ctrl-C meant for the script stays there. Nor where
    a program embedding Python set a handler of its own (None to Python): it could not be put back."""
    return _in_main_thread() and signal.getsignal(signum) not in (signal.SIG_IGN, None)


STUDY = "TEAMLORA_STUDY"  # study.py gives its runs its process id under this name


def end_with_study():
    """A run that study.py started stops as on SIGTERM (it ends its step and writes its checkpoint) once the study is
    gone, killed without a word to its runs (kill -9, the out-of-memory killer): alone, it trained on, holding its
    out_dir, and the study run again to continue it was refused there."""
    study = os.environ.get(STUDY, "")
    if not study.isdigit() or os.name != "posix":
        return
    study = int(study)

    def watch():  # a process whose parent ends is given another (init, or a subreaper)
        while os.getppid() == study:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def sigterm_as_ctrl_c():
    """For the duration, SIGTERM stops the run as Ctrl-C does (a KeyboardInterrupt): outside the training loop,
    where StopAfterStep takes both. train takes it once its processes have joined: a Python handler does not run while
    init_process_group waits for the others (a process stopped there waited on for a minute and more, until they came
    or the wait timed out), where SIGTERM's own action ends it at once, before anything is written. Under torchrun
    SIGTERM then leaves as _leaving has it, not by that action: the process is on its way out (train's teardown, main's
    exit code), and torchrun's SIGTERM once another had ended (stopped while scoring, say: 130) ended it as -15."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt) if takes_signal(signal.SIGTERM) else None
    try:
        yield
    finally:
        if old is not None:  # a handler of the caller's is given back
            signal.signal(signal.SIGTERM, _leaving() if old == signal.SIG_DFL and _with_others() else old)


class StopAfterStep:
    """Ctrl-C or SIGTERM while the loop trains: the step under way ends, then the run writes its checkpoint and
    stops; a step cut short could leave half an update (or FSDP half a backward) to save. A validation under way ends
    at its next batch (evaluation.val_loss), and a resume runs it again. A second Ctrl-C stops at once, keeping the
    last checkpoint; not under torchrun, which passes the terminal's Ctrl-C on to its processes (each gets two), and
    never a SIGTERM. Once trained() (the loop wrote its last step's checkpoint, or resumed from it) no step is left to
    end: a stop is told by what it stops, the loop (checkpoint.stop_run) or the scoring (evaluation.score), alone."""

    def __init__(self, master, trained=lambda: False):
        self.master, self.asked, self.forced, self.trained = master, False, False, trained
        self.forcible, self.old = "RANK" not in os.environ, {}  # old: the handlers install() replaced

    def __call__(self, signum, frame):
        if self.asked and signum == signal.SIGINT and self.forcible:
            self.forced = True
            raise KeyboardInterrupt
        if not self.asked and self.master and not self.trained():
            again = " (Ctrl-C again: at once, keeping the last one)" if self.forcible else ""
            print(f"\nstopping after this step, with a checkpoint{again}", file=sys.stderr, flush=True)
        self.asked = True

    def agreed(self, device, world):
        """Whether to stop after this step (or validation batch): asked on any of the `world` processes (they must
        stop after the same one)."""
        if world == 1:
            return self.asked
        asked = torch.tensor([float(self.asked)], device=device)
        dist.all_reduce(asked)
        return bool(asked.item())

    def install(self):
        self.old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM) if takes_signal(s)}
        return self

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
