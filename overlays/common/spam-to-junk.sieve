# Global sieve script run before the user's own (Dovecot "before" script), rendered by
# mkmailimage. filter-rspamd adds "X-Spam: yes" when rspamd answers "add header" (score over
# the add_header threshold, or a DMARC quarantine policy): such mail goes to Junk.
require ["fileinto", "mailbox"];

if header :is "X-Spam" "yes" {
  fileinto :create "Junk";
  stop;
}
