"""Serverless distributed training of neural networks on OpenFaaS."""
