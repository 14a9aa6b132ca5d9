# Loaded by a Jupyter server started in the project folder (`make lab`): a notebook saved with only outputs or
# volatile metadata changed is re-staged as the same blob, so `git status` stays clean (see nbs_lib.tracking.git_post_save).
from nbs_lib.tracking import git_post_save

c = get_config()  # noqa: F821
c.ContentsManager.post_save_hook = git_post_save
# offline: JupyterLab's news feed and its update check both reach the internet; neither runs
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = 'jupyterlab.handlers.announcements.NeverCheckForUpdate'
