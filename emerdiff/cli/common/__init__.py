"""Plumbing the commands share, one module per job (no entry point of its own; a command never imports another).

- `arguments`: --cfg files and key=value overrides merged into one config, --output and --overwrite;
- `trainer`: the Lightning Trainer from `trainer:`, its logger and progress bar, the segmentor for it;
- `naming`: the checked `ovseg` section and vocabulary, names read back from a results folder;
- `evaluation`: the labelled split of eval and ov_eval and their cache's settings;
- `messages`: counts in words, the random-weights notice, user mistakes as one `error:` line.
"""
