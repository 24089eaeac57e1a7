"""The evaluation harness: what serves measuring the defences, never imported by them.

`data` (offline data sets, OpenBackdoor files), `attacks` (BadNets / AddSent / StyleBkd poisoning),
`models` (offline models by short name), `victims` (cached backdoored fine-tunes and their CACC / ASR),
`metrics` (AUROC, FAR/FRR, ASR, CACC), `detection_report` (a detection result against ground truth:
JSON metrics and plots) and `repair` (the repair beyond ASR: a triggered copy of every class against a clean
reference, trigger shifting, relearning). The defences (`dupfast.detection`, `dupfast.purification`,
`dupfast.btu`) take models, tokenizers and batches from their caller.
"""
