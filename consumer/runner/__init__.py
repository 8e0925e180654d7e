"""Running an app from Python: `consumer.run(app, ...)` and `consumer.Runner`, with the settings,
defaults and behaviour of `offsetkeeper run` (whose command is a thin layer over this), and the
`RunResult` every run ends with: what was committed and why the run stopped. The test kit
(`consumer.testing`) drives its runs through the same recorder."""
