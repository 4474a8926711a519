"""DPO's reference log-probs computed once, on the prepared model (speed lever `precompute_ref_log_probs`).

The reference of a DPO step is the same model with the adapter off. TRL can compute its log-probs for every row
before training (`precompute_ref_log_probs`), but it does so in the DPOTrainer's constructor: before this project's
levers are on the model (NF4 weights dequantized once, packed batches with varlen attention, compiled layers), so
through bitsandbytes' path on padded rows. Here the same pass runs after them, through the trainer's own collator
and TRL's public `compute_ref_log_probs`, and the results become the dataset columns TRL's precompute would have
added (`ref_chosen_logps`, `ref_rejected_logps`); the training steps then read them instead of a reference forward.
The values are those the step's own reference forward computes: the base model, the same tokens, no dropout.
"""

from __future__ import annotations

import time

import torch

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_logps(trainer, dataset, batch_size: int, workers: int = 0) -> tuple[list[float], list[float]]:
    """The reference log-probs of each row of `dataset` (chosen, rejected), in its order.

    `workers` (lever dataloader_workers): processes that collate the next batches while the GPU runs this one;
    their batches come in pinned memory and are copied without waiting for the GPU.
    """
    device = trainer.accelerator.device
    pinned = device.type == "cuda"
    batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator,
                                          num_workers=workers, pin_memory=pinned)
    chosen, rejected = [], []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=pinned) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen.append(c.float())
        rejected.append(r.float())
    # one copy to the host at the end (it waits for the GPU, so the seconds below are the pass's): the GPU works
    # through the batches while the next ones are collated
    return torch.cat(chosen).tolist(), torch.cat(rejected).tolist()


def precompute(trainer, batch_size: int, workers: int = 0) -> dict:
    """Add the reference log-probs to the trainer's train (and eval) dataset and make its steps read them.

    Call it with the model prepared and, for packed batches, inside dpo_packing.packing. Returns what it did:
    rows and seconds (for the start event: the pass is part of the run's cost).
    """
    t0 = time.perf_counter()
    rows = 0
    for name in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, name)
        if dataset is None or COLUMNS[0] in dataset.column_names:
            continue
        values = reference_logps(trainer, dataset, batch_size, workers)
        for column, column_values in zip(COLUMNS, values):
            dataset = dataset.add_column(column, column_values)
        setattr(trainer, name, dataset)
        rows += len(dataset)
    trainer.precompute_ref_logps = True  # what TRL's step checks: read the columns, skip the reference forward
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 2)}
