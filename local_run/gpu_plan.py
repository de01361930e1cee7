"""Which of this machine's GPUs each site's ranks get, when job.py runs every site here (--env sim or poc).

Each site gets its own block of consecutive GPUs, one a rank. When the GPUs run out, the next site starts over
at the first GPU, so sites share. A site with more ranks than the machine has GPUs trains on the CPU (gloo).
A job for a real system (--export_config, --env prod) names no GPU: each site's own machine decides."""

import os


def visible_gpus() -> list[str]:
    """The GPUs to share out: CUDA_VISIBLE_DEVICES's entries where it is set, otherwise every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def default_ranks(gpus: int, n_sites: int, most: int) -> int:
    """Ranks a site when --nproc_per_node is not given: `most`, or fewer so that every site still trains on GPUs."""
    return most if gpus == 0 else max(1, min(most, gpus // n_sites))


def gpu_blocks(gpus: list[str], ranks: list[int]) -> list[list[str]]:
    """Each site's GPUs, for sites of these rank counts: consecutive blocks, starting over when the GPUs run out;
    none for a site with more ranks than there are GPUs."""
    blocks, start = [], 0
    for n in ranks:
        if n > len(gpus):
            blocks.append([])
            continue
        blocks.append([gpus[(start + i) % len(gpus)] for i in range(n)])
        start += n
    return blocks


def plan_lines(sites: list[str], ranks: list[int], blocks: list[list[str]], gpus: int) -> list[str]:
    """One line a site: its ranks, and the GPUs they take (with any site they share one with) or why the CPU."""
    lines = []
    for site, n, block in zip(sites, ranks, blocks):
        if not gpus:
            lines.append(f"{site}: {n} rank(s) on the CPU (gloo): no GPU is visible")
        elif not block:
            lines.append(
                f"{site}: {n} rank(s) on the CPU (gloo): {gpus} GPU(s) for {n} ranks, and NCCL needs one GPU per "
                f"rank; give it at most {gpus} with --nproc_per_node"
            )
        else:
            others = [other for other, theirs in zip(sites, blocks) if other != site and set(theirs) & set(block)]
            shared = f", shared with {', '.join(others)}" if others else ""
            lines.append(f"{site}: {n} rank(s) on GPU(s) {','.join(block)}{shared}")
    return lines
