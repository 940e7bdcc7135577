"""Files of exactly the structure the public code's trainers (CLAIRE-Labo/RAT, src/trainer/) save.

Both trainers save `{"task": state_dict, "config": EasyDict(resolved run config), "step": int,
"optimizer": ..., "lr_scheduler": ..., "resume_kwargs": {"resume_step": int}}` with `torch.save`.
The DDP trainer saves the bare task's state dict; the FSDP trainer a full state dict of
`torch.compile(FSDP(task))`: keys `_orig_mod.` + the module path (FSDP removes its own wrapper
names), optimizer state keyed by parameter name. The config is an `easydict.EasyDict` built from
`OmegaConf.to_container(cfg, resolve=True)`, so nested EasyDicts and plain lists, no omegaconf object.

`EasyDict` here pickles as the package's class does (a dict subclass whose items are mirrored as
attributes: NEWOBJ, SETITEMS, then BUILD with its __dict__); a module named `easydict` exists in
sys.modules only while saving, so neither the tests nor ratpt need the package.
"""
import contextlib
import sys
import types

import torch

INIT = {"_name_": "fixed", "initializer_range": 0.02}
PUBLIC_LAYER = {"rat": "rat", "attention": "attention", "swa": "local_attention"}


class EasyDict(dict):
    """A dict whose items are also attributes; nested dicts (also inside lists) become EasyDicts."""

    def __init__(self, items=None):
        super().__init__()
        for key, value in (items or {}).items():
            setattr(self, key, value)

    def __setattr__(self, name, value):
        if isinstance(value, list):
            value = [EasyDict(v) if isinstance(v, dict) else v for v in value]
        elif isinstance(value, dict) and not isinstance(value, EasyDict):
            value = EasyDict(value)
        super().__setattr__(name, value)
        super().__setitem__(name, value)

    __setitem__ = __setattr__


EasyDict.__module__ = "easydict"


@contextlib.contextmanager
def module_named(name: str, **members):
    """A module `name` holding `members`, importable (hence picklable by name) only inside the block."""
    module = types.ModuleType(name)
    for attr, member in members.items():
        setattr(module, attr, member)
    sys.modules[name] = module
    try:
        yield module
    finally:
        del sys.modules[name]


def _layer(mixer: str, D: int, head_dim: int, L: int, G: int, window: int) -> dict:
    """One sequence layer's resolved config (configs/model/backbone/layer/{rat,attention,local_attention}.yaml)."""
    cell = {"_name_": PUBLIC_LAYER[mixer], "d_model": D, "d_head": head_dim, "num_head": D // head_dim,
            "k_channel": head_dim, "bias": False, "ln": "rmsnorm", "init": INIT}
    if mixer == "rat":
        cell |= {"ngroups": G, "chunk_size": L}
    if mixer == "swa":
        cell["window_size"] = window
    return cell


def public_run_config(mixers: list[str], vocab: int, D: int, n_layers: int, ffn: int, head_dim: int,
                      L: int, G: int, window: int) -> dict:
    """The resolved run config of configs/experiment/fineweb_edu/{rat,attention,rat_localattention_interleave}-xl.yaml,
    at test size: `mixers` is ["rat"], ["attention"] or ["rat", "swa"] (RAT at even layers)."""
    backbone = {"_name_": "sequence", "num_layers": n_layers, "d_model": D, "bias": False, "ln": "rmsnorm",
                "dropout": 0.0, "init": INIT}
    if mixers == ["rat", "swa"]:
        backbone |= {"_name_": "sequence_interleave", "interleave_step": 2,
                     "seq_cell": _layer("swa", D, head_dim, L, G, window),
                     "seq_cell1": _layer("rat", D, head_dim, L, G, window)}
        pe = {"_name_": "rope_interrope", "dim": head_dim, "max_seq_len": 64, "max_num_chunk": 64 // L,
              "chunk_size": L, "base": 10000}
    else:
        (mixer,) = mixers
        backbone["seq_cell"] = _layer(mixer, D, head_dim, L, G, window)
        pe = ({"_name_": "interrope", "dim": head_dim, "max_num_chunk": 64 // L, "chunk_size": L, "base": 10000}
              if mixer == "rat" else {"_name_": "rope", "dim": head_dim, "base": 10000, "max_seq_len": 64})
    backbone["hidden_cell"] = {"_name_": "ffn", "d_model": D, "ln": "rmsnorm", "init": INIT, "d_ffn": ffn,
                               "act_fn": "gelu", "bias": False, "dropout": 0.0}
    return {
        "base_dir": "/tmp/sequence_model", "wandb_use": False,
        "wandb": {"entity": "e", "project": "sequence_model", "job_type": "fineweb_pretrain", "mode": "online",
                  "anonymous": "allow", "dir": "/tmp/sequence_model"},
        "trainer": {"test_speed": False, "max_epoch": 1, "device": "cuda", "seed": 1005, "load_checkpoint": True,
                    "save_checkpoint": True, "save_dir": "/tmp/ckpt", "save_interval": 0.1, "log_interval": 100,
                    "eval_when_log": False, "torch_compile": True, "dtype": "bfloat16", "global_batch_size": 512,
                    "gradient_clipping": 1.0, "check_gradient_norm": False, "pretrained_path": None},
        "data": {"_name_": "fineweb_llama", "seq_len": 64, "vocab_size": vocab, "batch_size": 2,
                 "global_batch_size": 512, "ignore_input_index": 2, "num_bytes": 2},
        "model": {"backbone": backbone,
                  "embedding": {"_name_": "lm", "vocab_size": vocab, "seq_len": 64, "d_model": D, "dropout": 0.0,
                                "init": INIT, "pe": pe},
                  "head": {"_name_": "lm", "vocab_size": vocab, "d_model": D, "init": INIT}},
        "task": {"_name_": "lm", "tie_embedding": True, "ignore_index": -100,
                 "loss": {"_name_": "cross_entropy", "ignore_index": -100},
                 "metric": {"_name_": "ppl", "ignore_index": -100}},
        "optim": {"optimizer": {"_name_": "adamw", "lr": 8.0e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
                  "lr_scheduler": {"_name_": "cosine", "warmup_iter": 0.05, "eta_min": 1.0e-6, "T_max": 1000}},
    }


def save_public_checkpoint(path, state: dict[str, torch.Tensor], run_config: dict, trainer: str = "ddp") -> None:
    """Save `state` (reference key names) as the public `trainer` ("ddp" or "fsdp") does after step 9.

    Weights are float32 (the trainers keep float32 parameters); the tied head shares the embedding's
    tensor as in `task.state_dict()`. The optimizer and scheduler states are real AdamW/cosine ones.
    """
    as_float = {}
    task = {name: as_float.setdefault(id(t), t.detach().float()) for name, t in state.items()}
    params = {name: torch.nn.Parameter(t.clone()) for name, t in task.items() if name != "head.lm_head.weight"}
    optimizer = torch.optim.AdamW(params.values(), lr=8.0e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000, eta_min=1.0e-6)
    sum((p * p).sum() for p in params.values()).backward()
    optimizer.step()
    scheduler.step()
    optim_state = optimizer.state_dict()
    if trainer == "fsdp":  # FSDP.optim_state_dict: state keyed by parameter name; the model behind torch.compile
        names = list(params)
        optim_state = {"state": {names[i]: s for i, s in optim_state["state"].items()},
                       "param_groups": [g | {"params": [names[i] for i in g["params"]]}
                                        for g in optim_state["param_groups"]]}
        task = {f"_orig_mod.{name}": t for name, t in task.items()}
    with module_named("easydict", EasyDict=EasyDict):
        torch.save({"task": task, "config": EasyDict(run_config), "step": 9, "optimizer": optim_state,
                    "lr_scheduler": scheduler.state_dict(), "resume_kwargs": {"resume_step": 9}}, path)
