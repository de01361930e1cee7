"""What runs and watches a run of the job, on this machine (--env sim, poc) or on a system (--env prod): job.py
calls local_run.runner.run_and_report once. Nothing here is part of the job that NVFlare ships to the sites."""
