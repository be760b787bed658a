"""torchrun worker (2 processes): the evaluation CLIs at TP=2, PP=2 and DP=2, in one launch.

argv: OUT_DIR MEGATRON_CKPT DATA_PREFIX TOKENIZER_MODEL. Writes OUT_DIR/{ppl,passkey}_tp{T}_pp{P}.json.
The process group is created here, so the tools keep it between runs and only rebuild the
model-parallel groups for each layout.
"""

import importlib.util
import sys
from pathlib import Path

from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks

REPO = Path(__file__).resolve().parents[2]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(out_dir: str, load: str, prefix: str, tokenizer: str) -> None:
    enable_cpu_fallbacks()
    runtime.initialize_distributed()
    perplexity, passkey = load_tool("eval_perplexity"), load_tool("eval_passkey")
    for tp, pp in ((2, 1), (1, 2), (1, 1)):  # the last: two data-parallel replicas
        layout = ["--load", load, "--tensor-model-parallel-size", str(tp),
                  "--pipeline-model-parallel-size", str(pp), "--tokenizer-model", tokenizer,
                  "--dtype", "fp32", "--no-plot", "--no-progress"]
        status = perplexity.main(layout + [
            "--data-path", prefix, "--lengths", "128,512", "--stride", "40", "--min-doc-tokens", "100",
            "--output", f"{out_dir}/ppl_tp{tp}_pp{pp}.json"])
        assert status == 0, ("perplexity", tp, pp)
        status = passkey.main(layout + [
            "--lengths", "200,300", "--trials", "2", "--seed", "5",
            "--output", f"{out_dir}/passkey_tp{tp}_pp{pp}.json"])
        assert status == 0, ("passkey", tp, pp)
    runtime.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:5])
