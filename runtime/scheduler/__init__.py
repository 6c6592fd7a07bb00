"""The scheduler: its loop (`scheduler`), the batches it builds (`schedule_batch`), the waiting-queue
policy, overlap scheduling, tensor-parallel ranks and the scheduler process."""
