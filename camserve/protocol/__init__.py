"""HTTP protocol of camserve: request decoding and response encoding, apart from the model and from TorchServe."""
