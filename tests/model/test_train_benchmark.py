"""benchmarks/train.py: once a micro-batch runs out of memory, larger ones of the same model and flags
are not tried (each costs a build and, compiled, a compile); other models and flags still are."""
import train


def test_larger_micro_batches_after_an_out_of_memory_are_skipped():
    ooms = {("rat_1p3b", frozenset({"compile"})): 12}
    assert train.smaller_out_of_memory(ooms, "rat_1p3b", {"compile"}, 16) == 12
    assert train.smaller_out_of_memory(ooms, "rat_1p3b", {"compile"}, 12) == 12
    assert train.smaller_out_of_memory(ooms, "rat_1p3b", {"compile"}, 8) is None
    assert train.smaller_out_of_memory(ooms, "rat_1p3b", {"compile", "ckpt"}, 16) is None
    assert train.smaller_out_of_memory(ooms, "attention_1p3b", {"compile"}, 16) is None
    cases = train.default_cases("rat_1p3b", "8,16")
    assert cases.index("rat_1p3b:8:compile") < cases.index("rat_1p3b:16:compile")  # ascending per flags
