"""NCP-SFT: supervised fine-tuning on the preferred images in the perceptual space.

    loss = PL_w      (winners only, no reference model)

PL is the perceptual error: the mean squared distance between f(x_{t-1}) for the model's and for the
true noise, f being a frozen copy of the base U-Net's down path (Algorithm 1, in ncp/train.py:train).
objective.space=latent trains the latent-space baseline of the same loss (mean((eps_pred - eps)^2)).

    accelerate launch -q train_ncp_sft.py --config configs/sd15_ncp_sft.yaml [key.sub=value ...]
"""

from ncp.hostmem import keep_host_memory

keep_host_memory()  # first, before torch loads: a CPU step reuses the memory it freed (ncp/hostmem.py)

from ncp.train import main as train_main  # noqa: E402
from ncp.errors import run_cli  # noqa: E402


def main(argv=None):
    """Parse --config FILE [key.sub=value ...] (argv or the command line), train, return the finished Run."""
    return train_main(argv, loss="sft", description=__doc__)


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
