"""Text in and files out: the tokenizer, chat templates, output files and their locks."""
