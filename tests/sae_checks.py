"""Helpers shared by the tests that train WriteSAEs through SAELens' runner."""

from __future__ import annotations

import torch


def explained_variance(sae, states):
    """1 - |states - decode(encode(states))|^2 / |states - mean|^2 over rows of flattened states [n, d_k * d_v]."""
    with torch.no_grad():
        recon = sae.decode(sae.encode(states))
    return float(1 - (states - recon).pow(2).sum() / (states - states.mean(0)).pow(2).sum())


def runner_config(sae_cfg, hook_name: str, head: int, context: int, batch_prompts: int, steps: int, output, **settings):
    """SAELens' runner config for a WriteSAE on one head of ``hook_name``, CPU, no logging: ``steps`` batches of
    ``batch_prompts`` contexts of ``context`` tokens; ``settings`` override or add runner fields (dataset, lr, ...)."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    base = dict(
        sae=sae_cfg, hook_name=hook_name, hook_head_index=head, streaming=False, context_size=context,
        training_tokens=context * batch_prompts * steps, train_batch_size_tokens=context * batch_prompts,
        store_batch_size_prompts=8, prepend_bos=False, device="cpu", lr=3e-3, logger=LoggingConfig(log_to_wandb=False),
        output_path=str(output), verbose=False, seed=0,
    )
    return LanguageModelSAERunnerConfig(**{**base, **settings})


def train_and_compare(sae_cfg, runner_cfg, model, dataset, states):
    """Train with SAELens' runner; return (the trained SAE, explained variance on ``states`` of an untrained SAE with
    the same mean initialisation of the decoder bias, that of the trained one)."""
    import writesae_lens.saes as ws
    from sae_lens import LanguageModelSAETrainingRunner

    untrained = ws.WriteTopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        untrained.b_dec.copy_(states.mean(0))  # the same mean initialisation, so only training differs
    sae = LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset).run()
    return sae, explained_variance(untrained, states), explained_variance(sae, states)


def firing_sae(model, tokens, layer: int, head: int, d_sae: int = 32, k: int = 4, seed: int = 0):
    """An untrained WriteTopKSAE on one head's states of ``tokens``: random factors (``seed``), decoder bias at the
    data mean, so that it fires; on the model's device."""
    import writesae_lens.saes as ws
    from writesae_lens.evaluation.substitution import head_states

    cfg = model.cfg
    torch.manual_seed(seed)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=d_sae, d_k=cfg.d_k, d_v=cfg.d_v, k=k,
                                                device=str(cfg.device)))
    states, _ = head_states(model, tokens, layer, head)
    with torch.no_grad():
        sae.b_dec.copy_(states.flatten(0, 1).mean(0))
    return sae
