"""NCP-CPO: Noise-Conditioned Perceptual Contrastive Preference Optimisation (paper Eq. 15).

    accelerate launch train_ncp_cpo.py --config configs/sd15_ncp_cpo.yaml [key.sub=value ...]

objective.space=latent trains the latent-space baseline of the same loss. The numbered lines are
those of the paper's Algorithm 1; the loop itself lives in ncp/train.py.
"""

from ncp.objective import compute_objective
from ncp.train import Trainer, parse_args


def main(argv=None):
    cfg = parse_args(argv, loss="cpo", description=__doc__)
    trainer = Trainer(cfg)  # 1-2: policy = base + LoRA, reference = LoRA off, f = frozen copy of the down path
    for batch in trainer.batches():  # 4: (x0_w, x0_l, c) ~ D
        x0, cond = trainer.encode(batch)
        rnd = trainer.sample_randomness(x0)  # 5, 7, 10: t, eps, z per pair
        with trainer.accumulate():
            loss, metrics = compute_objective(  # 8-18: x_t, reverse steps, errors in f's space, loss
                trainer.unet, trainer.encoder, trainer.schedule, x0, cond, rnd, cfg.objective
            )
            trainer.backward_and_step(loss, metrics)  # 19: gradient step on the LoRA
    trainer.finish()
    return trainer


if __name__ == "__main__":
    main()
