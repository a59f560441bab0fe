"""The two-tower retrieval model (numpy): training, storing its vectors in pgvector, and the EASE baseline.

Training code: not imported by the serving process.
"""
