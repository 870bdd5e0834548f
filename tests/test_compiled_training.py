"""Compiled training stays compiled: the guard against a regression no CPU eager test could see.

A training step compiled with torch.compile (inductor's C++ backend here, Triton on a GPU) is fast only while
dynamo reuses one graph. At a367f36 every model's training graph was compiled a second time after the first
sampling block (`frozen_weights` put a new attribute on the model, which failed the training graph's
guards), and bench.py timed that recompilation as training: compiled training measured 2.2× slower than
eager on a CPU and 3-8× slower than before on an H200. These tests run train.py's step on DiT-XS/8 for each
switch set, then sample as FID during training does, then train again, and hold:

- no graph break;
- exactly two graphs for the whole run (training, and sampling with frozen weights), none compiled after
  the first steps;
- the operations of the training graphs that AOTAutograd hands to inductor (forward and backward, the FX
  graphs' call nodes) at most a fixed count, as benchmarks/count_ops.py holds the eager operations: a change
  that adds operations to the compiled step must raise the bound knowingly, with its reason in the commit.
  Counted with torch 2.14.1 (pinned in requirements.txt); another version may trace a different graph.

The graphs are traced by dynamo and AOTAutograd and run as FX graphs (no inductor code generation, which
costs a minute or more per model on a CPU): the guards and the graphs are inductor's, only the kernels are
not generated. test_fast_paths.py compiles the all-eight model with inductor itself.
MAPDIT_COMPILE_TESTS=0 skips these tests.
"""
import contextlib
import dataclasses
import os
from collections import Counter

import pytest
import torch

from diffusion import create_diffusion
from phema import PowerEMA
from fast_paths import apply_fast_paths, frozen_weights
from models import build_model
from mp_layers import MPConfig
from training import compile_model, make_optimizer, training_step

pytestmark = pytest.mark.skipif(os.environ.get("MAPDIT_COMPILE_TESTS", "1") == "0", reason="MAPDIT_COMPILE_TESTS=0")

# Call nodes of the training graph's forward and backward for DiT-XS/8 on 4×16×16 latents (torch 2.14.1):
# an upper bound, fewer is fine. (Inductor generated 217, 300 and 441 C++ kernels for these graphs.)
MAX_TRAINING_OPS = {"none": {"forward": 396, "backward": 587},
                    "all": {"forward": 524, "backward": 737},
                    "all:scale+rotation+gate": {"forward": 715, "backward": 882}}


def switch_set(name):
    """none, all, or all:MODULATION."""
    base, _, modulation = name.partition(":")
    mp = MPConfig() if base == "none" else MPConfig.all_on()
    return dataclasses.replace(mp, modulation=modulation) if modulation else mp


def counting_backend(graphs):
    """A torch.compile backend that records each FX graph AOTAutograd produces (kind, call nodes) and runs it
    as it is."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, sum(node.op == "call_function" for node in gm.graph.nodes)))
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"),
                        inference_compiler=record("inference"))


def run_compiled(name, steps_before=2, steps_after=2):
    """train.py's step, compiled, for `steps_before` steps; one sampling forward under frozen weights in eval
    mode (as FID during training); `steps_after` more steps. Returns what dynamo and AOTAutograd did."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = apply_fast_paths(build_model("DiT-XS/8", in_channels=4, input_size=16, num_classes=10,
                                         mp=switch_set(name)))
    ema = PowerEMA(model, stds=(0.05,))
    opt, sched = make_optimizer(model, 1e-3, 0, 1000, device)
    graphs = []
    compiled = torch.compile(model, backend=counting_backend(graphs))
    diffusion = create_diffusion("")

    def train(first, n):
        for step in range(first, first + n):
            x, y = torch.randn(4, 4, 16, 16), torch.randint(0, 10, (4,))
            t = torch.randint(0, diffusion.num_timesteps, (4,))
            training_step(compiled, model, diffusion, opt, sched, ema, x, y, t, step=step + 1,
                          autocast=contextlib.nullcontext, compiled=True)

    seen = {}
    train(0, steps_before)
    seen["after training"] = counters["stats"]["unique_graphs"]
    model.eval()
    with torch.no_grad(), frozen_weights(model):
        compiled(torch.randn(4, 4, 16, 16), torch.full((4,), 500), torch.randint(0, 10, (4,)))
    model.train()
    seen["after sampling"] = counters["stats"]["unique_graphs"]
    train(steps_before, steps_after)
    seen["after training again"] = counters["stats"]["unique_graphs"]
    seen["graph breaks"] = sum(counters["graph_break"].values())
    seen["graphs"] = graphs
    torch._dynamo.reset()
    return seen


@pytest.fixture(scope="module", params=list(MAX_TRAINING_OPS))
def compiled_run(request):
    return request.param, run_compiled(request.param)


def test_compiled_training_has_no_graph_break(compiled_run):
    name, seen = compiled_run
    assert seen["graph breaks"] == 0, name


def test_compiled_training_compiles_one_training_and_one_sampling_graph_and_nothing_after(compiled_run):
    name, seen = compiled_run
    counts = (seen["after training"], seen["after sampling"], seen["after training again"])
    assert counts == (1, 2, 2), (f"{name}: graphs compiled after training, sampling, training again: {counts}; "
                                 f"run with TORCH_LOGS=recompiles to see which guard failed")


def test_compiled_training_step_stays_within_its_operation_count(compiled_run):
    name, seen = compiled_run
    kinds = Counter(kind for kind, _ in seen["graphs"])
    assert kinds == {"forward": 1, "backward": 1, "inference": 1}, (name, seen["graphs"])
    ops = dict((kind, n) for kind, n in seen["graphs"] if kind != "inference")
    bound = MAX_TRAINING_OPS[name]
    assert all(ops[k] <= bound[k] for k in bound), (f"{name}: the compiled training step has {ops} operations, "
                                                    f"more than {bound}")
