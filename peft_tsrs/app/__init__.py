"""The experiment app: the ``peft-tsrs`` command, YAML recipes, the shipped tasks and their data, run folders,
reports, plots, model cards and Hub upload. Built on the library (``peft_tsrs``); the library never imports it."""
