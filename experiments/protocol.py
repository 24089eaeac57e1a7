"""The SST-2 defender's protocol shared by the experiments: the clean set the defender holds and the
suspicious pool it defends.

clean set = one seeded half of the clean SST-2 dev split; pool = the other half + the attack's
dev-poison (every non-target dev sentence with the trigger), disjoint. Poison labels travel with the
samples (`Sample.poison_label`) and are read only to evaluate.
"""
import numpy as np

from dupfast.harness.data import load_sst2, load_sst2_poison, split_samples


def sst2_clean_and_pool(attack, data_dir=None, seed=0):
    """(clean set, pool) as lists of Samples; `seed` picks the halves."""
    dev = load_sst2("dev", data_dir)
    half = len(dev) // 2
    clean, pool_clean = split_samples(dev, [half, len(dev) - half], seed=seed)
    return clean, pool_clean + load_sst2_poison(attack, "dev", data_dir=data_dir)


def poison_labels(samples):
    return np.array([s.poison_label for s in samples])
