"""PEFT tuner types added by peft_tsrs, laid out like PEFT's own tuners."""
