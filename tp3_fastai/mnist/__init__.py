"""Part I: the from-scratch models (`models`) and their training on MNIST into a run folder (`train`)."""
