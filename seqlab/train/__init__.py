"""The lab: train a model on a task, record every run, compare architectures.

result = train(model_config, task, TrainConfig(steps=500))
store = ResultsStore(); store.add(run_record(...)); store.runs(task="mqar")
rows = probe("mqar", ["attn", "gdn"])     # `seqlab probe` from the command line
"""
