"""peft tuners defined by medtuning_peft."""
