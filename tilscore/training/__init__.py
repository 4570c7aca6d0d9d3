"""Training and evaluating models: labelled-tile importers (`importers`), datasets
(`data`), targets and losses, the training loop as plain functions (`train`) and its
configuration, metrics (`metrics`), running a model on labelled tiles (`eval_model`,
`eval_data`)."""
