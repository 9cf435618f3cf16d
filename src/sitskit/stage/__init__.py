"""What the training stages share: typed config (`config`, `sections`), command line and resume (`cli`),
safe run states (`state`), signals (`signals`), optimiser/schedule (`optim`) and the `Stage` base (`base`)."""
