"""Every parallel layout equals one process on the same batch: loss, gradients, grad norm and the
parameters after one optimizer step (tests/parallel/workers/layouts.py states the checks and tolerances).
Each such test reads one torchrun launch that runs several layouts, to keep the CPU time small (the
two-rank tests share theirs); the first two tests pin the zigzag context layout itself (which blocks a
rank holds, the balance)."""
import re

import pytest
import torch

from ratpt.config import load_config
from ratpt.parallel.context_blocks import ContextLayout
from ratpt.parallel.context_parallel import imbalance
from run_helpers import REPO, torchrun_cases


@pytest.mark.parametrize("cp, held", [(2, [[0, 3], [1, 2]]), (4, [[0, 7], [1, 6], [2, 5], [3, 4]])])
def test_zigzag_rank_holds_an_early_and_a_late_block_and_gathering_restores_the_sequence(cp, held):
    sequence = torch.arange(2 * cp * 3).view(1, -1) * 10  # 2·CP blocks of 3 tokens
    layouts = [ContextLayout("zigzag", r, cp) for r in range(cp)]
    for layout, blocks in zip(layouts, held):
        expected = torch.cat([torch.arange(3 * b, 3 * b + 3) for b in blocks])
        assert torch.equal(layout.positions(6), expected)
        assert torch.equal(layout.local(sequence), sequence[:, expected])
    gathered = torch.cat([layout.local(sequence) for layout in layouts], dim=1)  # an all-gather's rank order
    assert torch.equal(layouts[0].to_sequence_order(gathered, dim=1), sequence)


def test_zigzag_balances_the_causal_work_that_contiguous_slices_do_not():
    rat_1p3b = REPO / "configs" / "rat_1p3b.yaml"
    cfg = load_config(rat_1p3b, ["data.streams=[{path: unused}]"]).model
    rat = imbalance(cfg, 131072, 2)
    attention = imbalance(load_config(rat_1p3b, ["data.streams=[{path: unused}]", "model.mixers=[attention]"]).model,
                          131072, 2)
    # rank 1 of 2 contiguous halves attends over 3/4 of the causal triangle
    assert rat["contiguous"] == pytest.approx(1.118, abs=1e-3) and rat["zigzag"] == pytest.approx(1.0, abs=1e-12)
    assert attention["contiguous"] > 1.4 and attention["zigzag"] == pytest.approx(1.0, abs=1e-12)
    assert imbalance(cfg, 131072, 4)["zigzag"] == pytest.approx(1.0, abs=1e-12)


def run_layouts(nproc: int, *cases: str, **env_vars: str) -> str:
    return torchrun_cases(REPO / "tests" / "parallel" / "workers" / "layouts.py", nproc, cases=cases, **env_vars)


# the kernels' phases per block (Triton interpreter here), the summaries all-gathered between the
# states and the attention and their gradients reduce-scattered between the two backward parts;
# contiguous rank 0 attends to no other rank's summaries, yet joins both collectives
# (one layer where the model is RAT alone: a second adds no path through the exchange, only interpreter time;
# a global batch of 2: still 2 micro-batches accumulated, half the interpreter time of 4)
KERNEL_CASES = (
    "cp2-zigzag-rat-kernels:context=2,kernels=triton,head_dim=32,n_layers=1,global_batch=2",
    "cp2-contiguous-rat+swa-kernels:context=2,context_layout=contiguous,kernels=triton,head_dim=32,mixers=rat+swa,"
    "global_batch=2",
    # packed documents (tests/cases.py: row 0's chunk of tokens 13-20 straddles blocks 0 and 1, held by the two
    # ranks): the L - 1 tokens before each block received, the summaries summed into the whole row's table
    "cp2-zigzag-rat-kernels-documents:context=2,kernels=triton,head_dim=32,document_masking=true,n_layers=1,"
    "global_batch=2",
)
TWO_RANK_CASES = (
    "dp2:",  # megatron DDP + distributed optimizer, 2 micro-batches per rank (accumulation)
    "cp2-rat:context=2,context_layout=contiguous",  # chunk summaries all-gathered / reduce-scattered
    "cp2-rat+swa:context=2,mixers=rat+swa,context_layout=contiguous",  # sliding window: previous rank's last window
    "cp2-attention:context=2,mixers=attention,context_layout=contiguous",  # all-gather of K and V
    # zigzag: rank 0 holds blocks 0 and 3, rank 1 blocks 1 and 2 (block 2's window is its own block 1)
    "cp2-zigzag-rat:context=2,context_layout=zigzag",
    "cp2-zigzag-rat+swa:context=2,mixers=rat+swa,context_layout=zigzag",
    "cp2-zigzag-rat+attention:context=2,mixers=rat+attention,context_layout=zigzag",
    "resume-dp2-to-cp2:>context=2",  # state gathered in one layout, loaded into another
    # TP + SP: every mixer and the SwiGLU FFN as column/row-parallel linears, vocab-parallel
    # embedding, head and cross-entropy, norms' gradients all-reduced over TP
    "tp2-all-mixers:tensor=2,mixers=rat+swa+attention+rnn,n_layers=4,ffn=swiglu,micro_batch=2",
    "resume-tp2-to-one-process:tensor=2>local",  # TP shards gathered into the plain checkpoint
    # PP, interleaved 1F1B (2 virtual stages per rank; p2p across the two ranks both ways)
    "pp2-interleaved-rat+swa:pipeline=2,virtual_stages=2,n_layers=4,mixers=rat+swa",
    "resume-pp2-to-tp2:pipeline=2>tensor=2",  # stages merged, then TP shards scattered
    # the last stage's logits, then the loss (train.fused_loss=false; the default fuses them)
    "pp2-logits:pipeline=2,fused_loss=false",
    # packed documents that do not see each other (data.document_masking): the positions reach every
    # mixer of every TP rank and pipeline stage
    "tp2-documents:tensor=2,mixers=rat+swa+attention+rnn,n_layers=4,document_masking=true",
    "pp2-documents:pipeline=2,mixers=rat+swa,document_masking=true",
    # CP cuts whole chunks of the sequence, not of the documents (tests/cases.py: row 0 has a document of
    # 5 tokens and one whose chunk straddles the blocks at token 16): the straddling chunk's state crosses
    # ranks, the summaries and keys are masked by document, the window's exchanged tail too
    "cp2-zigzag-documents:context=2,mixers=rat+swa+attention,n_layers=3,document_masking=true",
    "cp2-contiguous-rat-documents:context=2,context_layout=contiguous,document_masking=true",
)
COMPILED = ",compile=true,compile_backend=aot_eager"  # traced as inductor would be, without CPU code generation
COMPILED_CASES = (
    f"dp2-compiled:{COMPILED}",
    f"pp2-compiled:pipeline=2{COMPILED}",  # 1F1B
    f"pp2-interleaved-compiled:pipeline=2,virtual_stages=2,n_layers=4{COMPILED}",
    f"tp2-compiled:tensor=2,ffn=swiglu{COMPILED}",
    f"cp2-zigzag-rat+swa-compiled:context=2,mixers=rat+swa,context_layout=zigzag{COMPILED}",
    f"cp2-attention-compiled:context=2,mixers=attention,context_layout=contiguous{COMPILED}",
    # a compiled run resumes an eager run's state and vice versa
    f"resume-eager-to-compiled:>tensor=2{COMPILED}",
    f"resume-compiled-to-eager:context=2{COMPILED}>local",
)


@pytest.fixture(scope="module")
def two_ranks() -> str:
    """Every two-rank case of the tests below in one torchrun launch (the ranks start once, not three
    times: seconds of imports each); each test reads its cases' verdicts."""
    return run_layouts(2, *TWO_RANK_CASES, *KERNEL_CASES, *COMPILED_CASES)


def reported_ok(output: str, cases: tuple[str, ...]) -> bool:
    return all(re.search(rf"^OK {re.escape(case.split(':')[0])} ", output, re.MULTILINE) for case in cases)


def test_context_parallel_with_the_fused_kernels_equals_one_process(two_ranks):
    assert reported_ok(two_ranks, KERNEL_CASES), two_ranks


def test_two_ranks_data_context_and_tensor_parallel_equal_one_process(two_ranks):
    assert reported_ok(two_ranks, TWO_RANK_CASES), two_ranks


def test_compiled_layouts_equal_one_process_eager_and_break_the_graph_only_at_collectives(two_ranks):
    # The graph breaks per block the design has (docs/parallelism.md, "Compiled engines"): none for DP
    # and PP; one per TP linear (megatron's sequence-parallel collectives: in_proj, out_proj, fc1, fc2);
    # one per context-parallel mixer (the chunk-summary or key/value exchange).
    breaks = {"dp2-compiled": 0, "pp2-compiled": 0, "pp2-interleaved-compiled": 0, "tp2-compiled": 4,
              "cp2-zigzag-rat+swa-compiled": 1, "cp2-attention-compiled": 1}
    assert reported_ok(two_ranks, COMPILED_CASES), two_ranks
    for name, expected in breaks.items():
        pattern = rf"^OK {re.escape(name)} .* graph breaks per block {expected}$"
        assert re.search(pattern, two_ranks, re.MULTILINE), two_ranks


def test_four_ranks_combined_layouts_pp_dp_cp_tp_equal_one_process():
    run_layouts(
        4,
        "dp2xcp2-rat+swa:context=2,mixers=rat+swa",
        "cp4-rat:context=4,context_layout=contiguous",
        # zigzag over 8 blocks of one chunk (= one window): windows cross ranks both ways, rank 3's second
        # block takes its own first block's tail
        "cp4-zigzag-rat:context=4,context_layout=zigzag",
        "cp4-zigzag-rat+swa:context=4,mixers=rat+swa,context_layout=zigzag",
        "cp4-zigzag-rat+attention:context=4,mixers=rat+attention,context_layout=zigzag",
        "resume-dp4-to-dp2xcp2:mixers=rat+attention>context=2,mixers=rat+attention",
        "dp4-replicated-optimizer:distributed_optimizer=false",
        "tp2xdp2:tensor=2",
        "tp2xcp2-rat+swa:tensor=2,context=2,mixers=rat+swa,context_layout=contiguous",
        "tp2xcp2-zigzag-rat+swa:tensor=2,context=2,mixers=rat+swa,context_layout=zigzag",
        "tp2xcp2-zigzag-documents:tensor=2,context=2,mixers=rat+swa+attention,n_layers=3,document_masking=true",
        # blocks of one chunk: a straddling chunk at every block boundary
        "cp4-zigzag-documents:context=4,mixers=rat+swa,document_masking=true",
        "pp2xdp2:pipeline=2",  # 1F1B; tied embedding/head all-reduced over the first and last stage
        "pp2xcp2-zigzag-rat+attention:pipeline=2,context=2,mixers=rat+attention,context_layout=zigzag",
        "pp2xtp2-interleaved-rat+swa:pipeline=2,tensor=2,virtual_stages=2,n_layers=4,mixers=rat+swa,micro_batch=2",
        f"tp2xcp2-compiled:tensor=2,context=2{COMPILED}",
        "resume-pp2xtp2-to-dp2xcp2:pipeline=2,tensor=2,mixers=rat+attention>context=2,mixers=rat+attention",
    )


def test_eight_ranks_the_composite_layouts_of_a_multi_gpu_node_equal_one_process():
    # the 8-GPU layouts of the RAT-1.3B runs (launch/rat_1p3b.sh), at toy size on gloo
    run_layouts(
        8,
        "tp2xpp2xdp2-rat+swa:tensor=2,pipeline=2,mixers=rat+swa",
        "cp4xdp2-zigzag-rat+swa:context=4,mixers=rat+swa",
        "resume-tp2xpp2xdp2-to-cp4xdp2:tensor=2,pipeline=2>context=4",
    )


@pytest.mark.gpu
def test_one_gpu_compiled_megatron_engine_overlapping_communication_equals_one_process():
    # inductor's code, megatron DDP with overlapped reduce-scatter and parameter all-gather (its
    # pre-forward waits moved to the compiled blocks), in a group of one, against eager fp32
    out = run_layouts(1, "dp1-compiled:compile=true", "dp1-compiled-recompute:compile=true,activation_checkpointing=true",
                      RATPT_TEST_DEVICE="cuda")
    assert re.search(r"^OK dp1-compiled .* graph breaks per block 0$", out, re.MULTILINE), out


@pytest.mark.gpu
def test_two_gpus_nccl_equal_one_process():  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_layouts(
        2,
        "dp2:",
        "cp2-rat+swa:context=2,mixers=rat+swa,context_layout=contiguous",
        "cp2-attention:context=2,mixers=attention,context_layout=contiguous",
        "cp2-zigzag-rat+swa:context=2,mixers=rat+swa,context_layout=zigzag",
        "cp2-zigzag-rat+attention:context=2,mixers=rat+attention,context_layout=zigzag",
        # the kernels' phases per block, the summaries exchanged between them
        "cp2-zigzag-rat-kernels:context=2,kernels=triton,head_dim=32",
        "cp2-contiguous-rat+swa-kernels:context=2,context_layout=contiguous,kernels=triton,head_dim=32,mixers=rat+swa",
        "cp2-zigzag-rat+swa-kernels-documents:context=2,kernels=triton,head_dim=32,mixers=rat+swa,document_masking=true",
        "tp2-all-mixers:tensor=2,mixers=rat+swa+attention+rnn,n_layers=4,ffn=swiglu,micro_batch=2",
        "pp2-interleaved-rat+swa:pipeline=2,virtual_stages=2,n_layers=4,mixers=rat+swa",
        "resume-pp2-to-tp2:pipeline=2>tensor=2",
        "resume-tp2-to-one-process:tensor=2>local",
        RATPT_TEST_DEVICE="cuda",
    )
